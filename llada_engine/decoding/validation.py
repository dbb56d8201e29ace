"""Validation of decoding arguments (placeholder until the shared validation module lands)."""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    gen_length: int = 256
    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_early_stop: bool = False
    mask_id: Optional[int] = None
    eos_id: Optional[int] = None


def decode_params(config, **kwargs) -> DecodeParams:
    p = DecodeParams(**kwargs)
    for name in ("gen_length", "block_length", "steps"):
        value = getattr(p, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    mask_id = config.mask_token_id if p.mask_id is None else p.mask_id
    eos_id = config.eos_token_id if p.eos_id is None else p.eos_id
    if mask_id is None or not 0 <= mask_id < config.vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary of {config.vocab_size}")
    return dataclasses.replace(p, steps=min(p.steps, p.gen_length), mask_id=mask_id, eos_id=eos_id)


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if len(prompts) and isinstance(prompts[0], int):
        prompts = [prompts]
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size})")
        checked.append(prompt)
    if not checked:
        raise ValueError("prompts is empty")
    return checked
