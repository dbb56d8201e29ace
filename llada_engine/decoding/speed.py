"""Decoding speed of a model on this machine: what `llada-engine bench` and `benchmarks/decode.py` report.

    prompts = random_prompts(config, batch, length, seed)     # token ids below every special id
    row = speed_row(model, prompts, gen_length=128)          # cached and uncached: tokens/s, TPF, step ms

Each path is warmed up by a short generation first; on a GPU the clock stops after a device synchronisation.
"""
import time

import torch

from .generate import GenerateOutput, generate


def random_prompts(config, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` random token ids, none of them MASK, EOS or padding."""
    if batch < 1 or length < 1:
        raise ValueError(f"batch and prompt length must be >= 1, got {batch} and {length}")
    special = [i for i in (config.mask_token_id, config.eos_token_id, config.pad_token_id) if i is not None]
    high = min(special + [config.vocab_size])
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (length,), generator=g).tolist() for _ in range(batch)]


def time_generate(model, prompts, **kwargs) -> tuple[GenerateOutput, float]:
    """generate(model, prompts, **kwargs) after a warm-up, and its wall time in seconds."""
    on_gpu = model.device.type == "cuda"
    generate(model, prompts, **(kwargs | dict(gen_length=8, block_length=8, steps=8, stream=None)))
    if on_gpu:
        torch.cuda.synchronize(model.device)
    begin = time.perf_counter()
    out = generate(model, prompts, **kwargs)
    if on_gpu:
        torch.cuda.synchronize(model.device)
    return out, time.perf_counter() - begin


def speed_row(model, prompts, *, gen_length: int, uncached: bool = True, **kwargs) -> dict:
    """Speeds of one batch with the KV cache (and without it, unless `uncached` is False)."""
    cached, t_c = time_generate(model, prompts, gen_length=gen_length, use_cache=True, **kwargs)
    row = {"batch": len(prompts), "prompt": len(prompts[0]), "gen": gen_length, "tokens": cached.stats.tokens,
           "TPF": cached.stats.tokens_per_forward, "cached_tok_s": cached.stats.tokens / t_c,
           "cached_step_ms": t_c / cached.stats.forward_passes * 1e3}
    if uncached:
        full, t_u = time_generate(model, prompts, gen_length=gen_length, use_cache=False, **kwargs)
        row |= {"uncached_tok_s": full.stats.tokens / t_u, "uncached_step_ms": t_u / full.stats.forward_passes * 1e3,
                "speedup": t_u / t_c * full.stats.tokens / max(cached.stats.tokens, 1),
                "identical": cached.sequences == full.sequences}
    return row
