"""Sweep of the batch-invariance promise: over random mixed batches of prompts, how many prompts decode to other
tokens in the batch than alone (greedy), or than alone with seed + i (seeded sampling), with and without the
KV cache, for the embedded default model in bf16 (its own dtype) and fp32.

    python -m benchmarks.batch_invariance [--batches 100] [--gen-length 16] [--fast]

--fast runs the model with batch_invariant=False (the fast numerics), to show what the mode prevents.
Prints one row per (dtype, decoding, cache), then one JSON line (last).
"""
import argparse
import random
import time

import torch

import llada_engine

from .timer import cpu_model, print_json, print_table


def random_batches(n: int, vocab_size: int, reserved: set, seed: int, max_prompts: int = 12,
                   max_len: int = 60) -> list[list[list[int]]]:
    """n batches of 1..max_prompts prompts of 1..max_len tokens, none of them in `reserved` (mask, EOS)."""
    rng = random.Random(seed)
    tokens = [t for t in range(vocab_size) if t not in reserved]
    return [[[rng.choice(tokens) for _ in range(rng.randint(1, max_len))] for _ in range(rng.randint(1, max_prompts))]
            for _ in range(n)]


def differences(model, batch: list[list[int]], *, use_cache: bool, sampled: bool, **settings) -> int:
    """Prompts of `batch` whose tokens in the batch differ from theirs alone (prompt i alone with seed + i)."""
    kw = dict(settings, use_cache=use_cache)
    if sampled:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    seed = kw.pop("seed", 0)
    together = llada_engine.generate(model, batch, seed=seed, **kw).sequences
    return sum(llada_engine.generate(model, [p], seed=seed + i, **kw).sequences[0] != together[i]
               for i, p in enumerate(batch))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--gen-length", type=int, default=16)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--fast", action="store_true", help="batch_invariant=False")
    args = parser.parse_args(argv)
    settings = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.block_length,
                    threshold=0.9)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        model = llada_engine.load_model("default", dtype=dtype, batch_invariant=not args.fast)
        cfg = model.config
        batches = random_batches(args.batches, cfg.vocab_size, {cfg.mask_token_id, cfg.eos_token_id}, seed=0)
        for sampled in (False, True):
            for use_cache in (True, False):
                started = time.perf_counter()
                diff = [differences(model, b, use_cache=use_cache, sampled=sampled, seed=7 * k, **settings)
                        for k, b in enumerate(batches)]
                rows.append(dict(dtype=str(dtype).removeprefix("torch."), decoding="sampled" if sampled else "greedy",
                                 cache=use_cache, batches=len(batches), prompts=sum(map(len, batches)),
                                 prompts_differing=sum(diff), batches_differing=sum(d > 0 for d in diff),
                                 seconds=round(time.perf_counter() - started, 1)))
                print_table(rows[-1:])
    print_table(rows)
    print_json(dict(benchmark="batch_invariance", cpu=cpu_model(), threads=torch.get_num_threads(),
                    batch_invariant=not args.fast, settings=settings, results=rows))


if __name__ == "__main__":
    main()
