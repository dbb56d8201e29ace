"""Block-diffusion decoding of a list of prompts (docs/ARCHITECTURE.md, Decoding): the official LLaDA2.0
`generate()`, batched, with a KV cache.

    generate(model, prompts, *, gen_length=256, block_length=32, steps=32, threshold=0.95, temperature=0.0,
             top_k=0, top_p=1.0, eos_early_stop=False, mask_id=None, eos_id=None, use_cache=True, seed=0,
             stream=None) -> GenerateOutput(sequences, stats)

Each prompt gets MASK tokens up to a whole number of blocks; blocks are decoded left to right, each in up to
`steps` steps that commit tokens with `commit_tokens` under the official minimum schedule; a sequence stops
after a block that contains EOS and its output is cut just after the first EOS. Blocks wholly inside the
prompt are never denoised; the block holding the prompt's tail is, with the prompt tokens fixed.

use_cache=True submits every prompt to a continuous-batching Engine (engine.py) sized for them and runs it
until idle: the prompt's whole blocks are prefilled once into a paged KV cache, each step runs only the
current block of each sequence, a finished block is stored by one more forward of that block. use_cache=False
is the reference (uncached.py): every step recomputes each sequence's whole prefix, as the official code does.
Both give the same tokens. Greedy decoding gives every prompt the same tokens alone or in any batch. Sampling
draws prompt i's tokens from the Philox stream of seed + i, step by step, so prompt i in a batch gets what it
gets alone with seed + i, with or without the cache.
"""
import dataclasses
import time
from typing import Callable, Optional, Sequence, Union

import torch

from .. import ops
from .engine import Engine, page_size, pages_needed
from .stats import GenerateStats
from .uncached import generate_uncached
from .validation import SEED_LIMIT, check_generate

StreamCallback = Callable[[int, list[int]], None]


@dataclasses.dataclass
class GenerateOutput:
    sequences: list[list[int]]   # per prompt: its generated tokens, through the first EOS if one was produced
    stats: GenerateStats


def generate(model, prompts: Union[Sequence[int], Sequence[Sequence[int]]], *, gen_length: int = 256,
             block_length: int = 32, steps: int = 32, threshold: float = 0.95, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_early_stop: bool = False, mask_id: Optional[int] = None,
             eos_id: Optional[int] = None, use_cache: bool = True, seed: int = 0,
             stream: Optional[StreamCallback] = None) -> GenerateOutput:
    """Decodes every prompt by block diffusion; see the module doc. `stream(prompt_index, tokens)` receives
    each prompt's tokens as its blocks complete."""
    prompts, params = check_generate(
        model.config, prompts, use_cache=use_cache, stream=stream, gen_length=gen_length, block_length=block_length,
        steps=steps, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_early_stop=eos_early_stop, mask_id=mask_id, eos_id=eos_id)
    stats = GenerateStats()
    started = time.perf_counter()
    if use_cache:
        sequences = _generate_cached(model, prompts, params, stream, stats)
    else:
        commit = ops.commit_tokens if model.backend == "kernels" else ops.commit_tokens_ref
        with torch.no_grad():
            sequences = generate_uncached(model, prompts, params, commit, stream, stats)
    stats.seconds = time.perf_counter() - started
    stats.tokens = sum(len(s) for s in sequences)
    return GenerateOutput(sequences, stats)


def _generate_cached(model, prompts, params, stream, stats) -> list[list[int]]:
    Lb = params.block_length
    pages = sum(pages_needed(len(p), params.gen_length, Lb) for p in prompts)
    engine = Engine(model, max_running=len(prompts), cache_tokens=pages * page_size(Lb), block_length=Lb)
    requests = []
    for i, prompt in enumerate(prompts):
        callback = None if stream is None else (lambda tokens, i=i: stream(i, tokens))
        requests.append(engine.submit(prompt, **{f.name: getattr(params, f.name) for f in dataclasses.fields(params)
                                                 if f.name != "seed"}, seed=(params.seed + i) % SEED_LIMIT,
                                     callback=callback))
    engine.run_until_idle()
    stats.forward_passes, stats.denoise_steps = engine.stats.forward_passes, engine.stats.denoise_steps
    return [r.result() for r in requests]
