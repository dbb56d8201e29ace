"""Chat formatting of prompts: the checkpoint's own chat template (tokenizer_config.json) when it has one,
else the LLaDA2.0 release's role format:

    <role>SYSTEM</role>...<|role_end|><role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>...<|role_end|>
    ...<role>ASSISTANT</role>            (the assistant's next turn, to be generated)
"""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

RELEASE_ROLES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}
RELEASE_TURN = "<role>{role}</role>{content}<|role_end|>"
RELEASE_REPLY = "<role>ASSISTANT</role>"


def chat_template(checkpoint: Union[str, Path, None]) -> Optional[str]:
    """The checkpoint's chat template (tokenizer_config.json's chat_template), or None."""
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if config is None or not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    return template if isinstance(template, str) else None


def chat_text(messages: Sequence[dict], checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a chat, ready for the assistant's next turn: `messages` are {"role", "content"} dicts with
    roles system (or developer), user and assistant, and string contents."""
    template = chat_template(checkpoint)
    if template is not None:
        import jinja2

        return jinja2.Environment().from_string(template).render(messages=list(messages), add_generation_prompt=True)
    for i, m in enumerate(messages):
        if m["role"] not in RELEASE_ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is not one of {sorted(RELEASE_ROLES)}")
    turns = [RELEASE_TURN.format(role=RELEASE_ROLES[m["role"]], content=m["content"]) for m in messages]
    return "".join(turns) + RELEASE_REPLY


def chat_prompt(prompt: str, checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a one-turn chat asking `prompt`, ready for generation."""
    return chat_text([{"role": "user", "content": prompt}], checkpoint)
