"""Chat formatting of prompts: the checkpoint's own chat template (tokenizer_config.json) when it has one,
rendered by jinja2 in a sandbox with the settings transformers' `apply_chat_template` uses, else the
LLaDA2.0 release's role format:

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
    """The chat template of a local checkpoint folder (tokenizer_config.json's chat_template), or None."""
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if config is None or not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config}: not a readable tokenizer_config.json ({error})") from None
    return template if isinstance(template, str) else None


def _render(template: str, messages: list, checkpoint: Union[str, Path]) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True)
    except jinja2.TemplateError as error:
        config = Path(checkpoint) / "tokenizer_config.json"
        raise ValueError(f"{config}: its chat_template fails ({type(error).__name__}: {error})") from None


def chat_text(messages: Sequence[dict], checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a chat, ready for the assistant's next turn: `messages` are {"role", "content"} dicts with
    roles system (or developer), user and assistant, and string contents; `checkpoint` is a local folder."""
    template = chat_template(checkpoint)
    if template is not None:
        return _render(template, list(messages), checkpoint)
    for i, m in enumerate(messages):
        if m["role"] not in RELEASE_ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is not one of {sorted(RELEASE_ROLES)}")
    turns = [RELEASE_TURN.format(role=RELEASE_ROLES[m["role"]], content=m["content"]) for m in messages]
    return "".join(turns) + RELEASE_REPLY


def chat_prompt(prompt: str, checkpoint: Union[str, Path, None] = None) -> str:
    """The text of a one-turn chat asking `prompt`, ready for generation; `checkpoint` is a local folder."""
    return chat_text([{"role": "user", "content": prompt}], checkpoint)
