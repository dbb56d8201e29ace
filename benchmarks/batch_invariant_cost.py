"""What the batch-invariant numerics cost: the embedded default model with batch_invariant=True (the default)
against batch_invariant=False (F.linear and the grouped GEMM's fastest path by rows per expert), on the same
machine in the same run, the two modes timed alternately so that load drifts hit both alike.

    python -m benchmarks.batch_invariant_cost [--dtypes bfloat16,float32] [--batch 1 16] [--prefill 4096]

decode: generate() with the KV cache, `batch` prompts of 64 tokens, 32 new tokens in one block of 32 (32
denoising steps); ms per forward pass (median of the runs). prefill: one forward of `prefill` packed tokens
(4 sequences, block_causal). slowdown: invariant time over fast time. The last line printed is JSON.
"""
import argparse
import statistics
import time

import torch

import llada_engine
from .timer import cpu_model, print_json, print_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for name in args.dtypes.split(","):
        model = llada_engine.load_model("default", dtype=getattr(torch, name))
        cases = {}
        for batch in args.batch:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, model.config.vocab_size, (batch, 64), generator=g).tolist()

            def decode(prompts=prompts):
                out = llada_engine.generate(model, prompts, gen_length=32, block_length=32, steps=32)
                return out.stats.seconds / out.stats.forward_passes
            cases[f"decode batch {batch}"] = decode
        T = args.prefill
        ids = torch.randint(3, model.config.vocab_size, (T,))
        cu = torch.tensor([0, T // 4, T // 2, 3 * T // 4, T], dtype=torch.int32)

        def prefill():
            started = time.perf_counter()
            with torch.no_grad():
                model(ids, cu, block_size=32, mask="block_causal")
            return time.perf_counter() - started
        cases[f"prefill {T} tokens"] = prefill

        for case, fn in cases.items():
            times = {True: [], False: []}
            for mode in (True, False):   # warm-up
                model.batch_invariant = mode
                fn()
            for _ in range(args.repeats):
                for mode in (True, False):
                    model.batch_invariant = mode
                    times[mode].append(fn())
            inv, fast = statistics.median(times[True]), statistics.median(times[False])
            rows.append(dict(dtype=name, case=case, invariant_ms=round(inv * 1e3, 2), fast_ms=round(fast * 1e3, 2),
                             slowdown=round(inv / fast, 3)))
            print_table(rows[-1:])
        model.batch_invariant = True
    print(f"# cpu: {cpu_model()}, threads: {torch.get_num_threads()}")
    print_table(rows)
    print_json(dict(benchmark="batch_invariant_cost", cpu=cpu_model(), threads=torch.get_num_threads(), results=rows))


if __name__ == "__main__":
    main()
