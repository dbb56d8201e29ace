"""Chat formatting of prompts: the checkpoint's own chat template (tokenizer_config.json) when it has one,
rendered by jinja2 in a sandbox with the settings transformers' `apply_chat_template` uses, else the
LLaDA2.0 release's role format."""
import json
from pathlib import Path
from typing import Union

RELEASE_FORMAT = "<role>HUMAN</role>{prompt}<|role_end|><role>ASSISTANT</role>"


def chat_prompt(prompt: str, checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a one-turn chat asking `prompt`, ready for generation; `checkpoint` is a local folder."""
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if config is None or not config.is_file():
        return RELEASE_FORMAT.format(prompt=prompt)
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config}: not a readable tokenizer_config.json ({error})") from None
    if not isinstance(template, str):
        return RELEASE_FORMAT.format(prompt=prompt)
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                                add_generation_prompt=True)
    except jinja2.TemplateError as error:
        raise ValueError(f"{config}: its chat_template fails ({type(error).__name__}: {error})") from None
