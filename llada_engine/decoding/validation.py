"""The arguments of block-diffusion decoding, checked in one place for every backend: pure host-side
functions that turn what a caller passed into checked values, or raise an ArgumentError (a ValueError)
that names the argument and says what is expected. generate() checks a whole call with `check_generate`;
a server checks each request with the same pieces:

    params = decode_params(model.config, gen_length=256, temperature=0.7, seed=3)   # -> DecodeParams
    prompt = check_prompts([ids], model.config.vocab_size)[0]                      # -> list[int]
    check_positions(len(prompt), params, model.config.max_position_embeddings)

Ranges: gen_length, block_length, steps ints >= 1 (steps is capped at gen_length, as the official code
does); threshold in [0, 1]; temperature 0 (greedy) or in [MIN_TEMPERATURE, inf); top_k >= 0 (0: off; one
above the vocabulary size keeps every token, and is capped at it); top_p in (0, 1]; seed an int in
[0, 2**64); mask_id and eos_id token ids inside the vocabulary (default: the config's; an official
config.json has no mask_token_id, so then mask_id must be given). Ints are real ints (Python or numpy),
never bools; floats are finite.
"""
import dataclasses
import math
import numbers
from typing import Optional

import torch

from ..model.config import RELEASE_MASK_ID

# Below this, logits / temperature can overflow fp32 (1 / 1e-45 is already inf); any temperature this small
# samples the argmax anyway.
MIN_TEMPERATURE = 1e-4
SEED_LIMIT = 2**64


class ArgumentError(ValueError):
    """A decoding argument out of its range or of the wrong type; `argument` is its name."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """The checked arguments of one decoding request, mask and EOS ids resolved, steps capped."""
    gen_length: int
    block_length: int
    steps: int
    threshold: float
    temperature: float
    top_k: int
    top_p: float
    seed: int
    eos_early_stop: bool
    mask_id: int
    eos_id: Optional[int]

    def positions(self, prompt_length: int) -> int:
        """Positions the model runs for a prompt of this length: prompt + gen_length in whole blocks."""
        return -(-(prompt_length + self.gen_length) // self.block_length) * self.block_length


def stream_seed(seed: int, index: int) -> int:
    """The commit_tokens seed of prompt `index` of a call with `seed`: seed + index modulo 2**64, as the op's
    signed 64-bit argument (the kernels read the same bits as uint64)."""
    value = (seed + index) % SEED_LIMIT
    return value - SEED_LIMIT if value >= SEED_LIMIT // 2 else value


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ without importing numpy


def _int(name: str, value, low: int, high: Optional[int], expected: str) -> int:
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ArgumentError(name, f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or (high is not None and value >= high):
        raise ArgumentError(name, f"{name} must be {expected}, got {value}")
    return value


def _float(name: str, value, what: str) -> float:
    try:
        ok = not _is_bool(value) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    except OverflowError:
        ok = False
    if not ok:
        raise ArgumentError(name, f"{name} must be {what}, got {value!r}")
    return float(value)


def _token_id(name: str, value, config, key: str) -> Optional[int]:
    """An explicit id, else the config's `key`, checked against the vocabulary; None if neither exists."""
    vocab = config.vocab_size
    if value is None:
        value = getattr(config, key)
        if value is None:
            return None
        if not 0 <= value < vocab:
            raise ArgumentError(name, f"{name}: config.json's {key} {value} is outside the vocabulary "
                                      f"[0, {vocab}); pass {name}=...")
        return value
    return _int(name, value, 0, vocab, f"a token id in [0, {vocab})")


def decode_params(config, *, gen_length: int = 256, block_length: int = 32, steps: int = 32,
                  threshold: float = 0.95, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, eos_early_stop: bool = False, mask_id: Optional[int] = None,
                  eos_id: Optional[int] = None) -> DecodeParams:
    """The checked DecodeParams of these arguments for a model of `config` (defaults: generate()'s)."""
    gen_length = _int("gen_length", gen_length, 1, None, "a positive int")
    block_length = _int("block_length", block_length, 1, None, "a positive int")
    steps = _int("steps", steps, 1, None, "a positive int")
    threshold = _float("threshold", threshold, "a number in [0, 1]")
    if not 0.0 <= threshold <= 1.0:
        raise ArgumentError("threshold", f"threshold must be a number in [0, 1], got {threshold}")
    expected = f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} (smaller ones overflow logits / temperature)"
    temperature = _float("temperature", temperature, expected)
    if temperature != 0.0 and temperature < MIN_TEMPERATURE:
        raise ArgumentError("temperature", f"temperature must be {expected}, got {temperature!r}")
    top_k = min(_int("top_k", top_k, 0, None, "an int >= 0 (0: no top-k)"), config.vocab_size)
    top_p = _float("top_p", top_p, "a number in (0, 1]")
    if not 0.0 < top_p <= 1.0:
        raise ArgumentError("top_p", f"top_p must be a number in (0, 1], got {top_p}")
    seed = _int("seed", seed, 0, SEED_LIMIT, "an int in [0, 2**64)")
    if not _is_bool(eos_early_stop):
        raise ArgumentError("eos_early_stop", f"eos_early_stop must be True or False, got {eos_early_stop!r}")
    resolved_mask = _token_id("mask_id", mask_id, config, "mask_token_id")
    if resolved_mask is None:
        raise ArgumentError("mask_id", f"mask_id: the checkpoint's config.json has no mask_token_id; pass "
                                       f"mask_id=... (LLaDA2.0 releases use {RELEASE_MASK_ID})")
    resolved_eos = _token_id("eos_id", eos_id, config, "eos_token_id")
    if resolved_eos == resolved_mask:
        raise ArgumentError("eos_id", f"eos_id and mask_id are both {resolved_mask}: EOS must be another token")
    if eos_early_stop and resolved_eos is None:
        raise ArgumentError("eos_early_stop", "eos_early_stop needs an EOS id: config.json has no eos_token_id; "
                                              "pass eos_id=...")
    return DecodeParams(gen_length, block_length, min(steps, gen_length), threshold, temperature, top_k, top_p,
                        seed, bool(eos_early_stop), resolved_mask, resolved_eos)


def _is_token(value) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _prompt(name: str, prompt, vocab_size: int) -> list[int]:
    """One prompt: a sequence of token ids or a 1-D integer tensor / array."""
    if isinstance(prompt, (str, bytes, bytearray)):
        raise ArgumentError("prompts", f"{name} is a {type(prompt).__name__}: expected token ids (encode text "
                                       f"with the checkpoint's tokenizer first)")
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape"):        # a torch tensor or a numpy array
        if len(prompt.shape) != 1:
            raise ArgumentError("prompts", f"{name} has shape {list(prompt.shape)}: expected a 1-D sequence of "
                                           f"token ids")
        dtype = prompt.dtype
        integral = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
                    if isinstance(prompt, torch.Tensor) else dtype.kind in "iu")
        if not integral:
            raise ArgumentError("prompts", f"{name} has dtype {dtype}: expected integer token ids")
        prompt = prompt.tolist()
    try:
        tokens = list(prompt)
    except TypeError:
        raise ArgumentError("prompts", f"{name} is {_describe(prompt)}: expected a sequence of token ids") from None
    for j, token in enumerate(tokens):
        if not _is_token(token):
            raise ArgumentError("prompts", f"{name}[{j}] is {_describe(token)}: expected an int token id")
    if not tokens:
        raise ArgumentError("prompts", f"{name} is empty: a prompt needs at least one token")
    bad = next((j for j, t in enumerate(tokens) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ArgumentError("prompts", f"{name} has token ids outside [0, {vocab_size}): {name}[{bad}] is "
                                       f"{tokens[bad]}")
    return [int(t) for t in tokens]


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints: one prompt (token ids, or a 1-D integer tensor) or a sequence of them (or a
    2-D integer tensor, a prompt per row). Floats, strings, bytes and bools are refused, naming prompts[i]."""
    if isinstance(prompts, (str, bytes, bytearray)):
        raise ArgumentError("prompts", f"prompts is a {type(prompts).__name__}: expected token ids (encode text "
                                       f"with the checkpoint's tokenizer first)")
    if hasattr(prompts, "dtype") and hasattr(prompts, "shape"):
        if len(prompts.shape) == 1:
            return [_prompt("prompts", prompts, vocab_size)]
        if len(prompts.shape) != 2:
            raise ArgumentError("prompts", f"prompts has shape {list(prompts.shape)}: expected token ids [L] or "
                                           f"a batch [B, L]")
        prompts = list(prompts)
    try:
        items = list(prompts)
    except TypeError:
        raise ArgumentError("prompts", f"prompts is {_describe(prompts)}: expected token ids or a list of "
                                       f"prompts") from None
    if not items:
        raise ArgumentError("prompts", "prompts is empty: give at least one prompt")
    if isinstance(items[0], numbers.Number):                           # token ids: one prompt
        return [_prompt("prompts", items, vocab_size)]
    return [_prompt(f"prompts[{i}]", prompt, vocab_size) for i, prompt in enumerate(items)]


def check_positions(prompt_length: int, params: DecodeParams, max_position_embeddings: int,
                    name: str = "prompt") -> None:
    """Refuses a request whose prompt and generation, in whole blocks, run past the model's positions."""
    positions = params.positions(prompt_length)
    if positions > max_position_embeddings:
        raise ArgumentError("gen_length", f"{name}: {prompt_length} prompt tokens + gen_length {params.gen_length}, "
                                          f"in whole blocks of block_length {params.block_length}, run {positions} "
                                          f"positions, more than the model's max_position_embeddings "
                                          f"{max_position_embeddings}")


def check_generate(config, prompts, *, use_cache, stream, **kwargs) -> tuple[list[list[int]], DecodeParams]:
    """Everything generate(model, prompts, **kwargs) is given, checked: (prompts as lists of ints, params)."""
    params = decode_params(config, **kwargs)
    checked = check_prompts(prompts, config.vocab_size)
    for i, prompt in enumerate(checked):
        check_positions(len(prompt), params, config.max_position_embeddings, f"prompts[{i}]")
    if not _is_bool(use_cache):
        raise ArgumentError("use_cache", f"use_cache must be True or False, got {use_cache!r}")
    if stream is not None and not callable(stream):
        raise ArgumentError("stream", f"stream must be None or a callable(prompt_index, tokens), got {stream!r}")
    return checked, params
