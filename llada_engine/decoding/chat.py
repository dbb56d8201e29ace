"""Chat formatting of prompts: the checkpoint's own chat template (tokenizer_config.json) when it has one,
else the LLaDA2.0 release's role format."""
import json
from pathlib import Path
from typing import Union

RELEASE_FORMAT = "<role>HUMAN</role>{prompt}<|role_end|><role>ASSISTANT</role>"


def chat_prompt(prompt: str, checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a one-turn chat asking `prompt`, ready for generation."""
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if config is not None and config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            import jinja2

            return jinja2.Environment().from_string(template).render(
                messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    return RELEASE_FORMAT.format(prompt=prompt)
