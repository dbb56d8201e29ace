"""Benchmark of commit_tokens: ours against the composed-torch reference, greedy and sampled.

    python -m benchmarks.commit_tokens [--device cpu|cuda] [--quick]

Shapes [B, 32, 157184] (LLaDA2.0 vocabulary), B in {1, 16}, fp32 and bf16 logits, every position masked.
The op reads the logits once, so GB/s counts the logits bytes; the fraction is of the copy bandwidth
measured in the same run. `ours_ms` is the public call (with its NaN check, one host sync on a GPU);
`op_ms` is the bare op, launched back to back (what a step pays once launches overlap the GPU work), and
GB/s is taken from it.
Per-sequence parameters: a batch of B = 16 sequences, each with its own seed and offset (all sampled, or half
greedy and half sampled), in one call with [B] tensors (`batched_ms`, check_finite=False: no sync) against
the B calls on one sequence each that a decoder without per-sequence parameters makes (`single_ms`);
`speedup` = single_ms / batched_ms. The last line printed is JSON.
"""
import argparse

import torch

from benchmarks.timer import peak_bandwidth, print_json, print_table, time_fn
from llada_engine.ops import commit_tokens, commit_tokens_ref

VOCAB = 157184
BLOCK = 32
LAUNCHES = 20  # bare-op launches per timed run


def bench_case(device, batch, vocab, dtype, sampling, repeats):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, BLOCK, vocab, generator=g) * 3).to(dtype).to(device)
    tokens = torch.full((batch, BLOCK), vocab - 1, device=device)
    kw = dict(mask_id=vocab - 1, threshold=0.95, min_commit=1, **sampling)
    ours = time_fn(lambda: commit_tokens(tokens, logits, **kw), device=device, repeats=repeats)
    min_commit = torch.ones(batch, dtype=torch.int32, device=device)
    scalars = dict(threshold=0.95, temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0) | sampling
    dtypes = dict(threshold=torch.float32, temperature=torch.float32, top_k=torch.int32, top_p=torch.float32,
                  seed=torch.int64, offset=torch.int64)
    per_seq = [torch.full((batch,), scalars[n], dtype=dt, device=device) for n, dt in dtypes.items()]

    def back_to_back():
        for _ in range(LAUNCHES):
            torch.ops.llada.commit_tokens_per_seq(tokens, logits, min_commit, *per_seq, mask_id=vocab - 1,
                                                  own_streams=False)
    op = time_fn(back_to_back, device=device, repeats=repeats) / LAUNCHES
    ref = time_fn(lambda: commit_tokens_ref(tokens, logits, **kw), device=device, repeats=max(3, repeats // 3))
    return ours, op, ref, logits.numel() * logits.element_size()


def bench_per_seq(device, batch, vocab, dtype, mode, repeats):
    """One call with per-sequence parameters against `batch` calls on one sequence each."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(batch, BLOCK, vocab, generator=g) * 3).to(dtype).to(device)
    tokens = torch.full((batch, BLOCK), vocab - 1, device=device)
    sampled = dict(temperature=0.8, top_k=50, top_p=0.9)
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0)
    rows = [dict(threshold=0.95, seed=1000 + b, offset=b % 5,
                 **(greedy if mode == "mixed" and b % 2 == 0 else sampled)) for b in range(batch)]
    dtypes = dict(threshold=torch.float32, temperature=torch.float32, top_k=torch.int32, top_p=torch.float32,
                  seed=torch.int64, offset=torch.int64)
    params = {n: torch.tensor([r[n] for r in rows], dtype=dt, device=device) for n, dt in dtypes.items()}
    min_commit = torch.ones(batch, dtype=torch.int32, device=device)
    kw = dict(mask_id=vocab - 1, check_finite=False)
    batched = time_fn(lambda: commit_tokens(tokens, logits, min_commit=min_commit, **params, **kw), device=device,
                      repeats=repeats)

    def single_rows():
        parts = [commit_tokens(tokens[b:b + 1], logits[b:b + 1], min_commit=min_commit[b:b + 1], **rows[b], **kw)
                 for b in range(batch)]
        return torch.cat([p.tokens for p in parts]), torch.cat([p.committed for p in parts])
    single = time_fn(single_rows, device=device, repeats=repeats)
    return {"shape": f"[{batch},{BLOCK},{vocab}]", "dtype": str(dtype).replace("torch.", ""), "mode": mode,
            "batched_ms": batched * 1e3, "single_ms": single * 1e3, "speedup": single / batched}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small vocabulary, few repeats (a smoke run)")
    args = parser.parse_args(argv)

    vocab = 8192 if args.quick else VOCAB
    repeats = 3 if args.quick else 10
    bandwidth = peak_bandwidth(args.device, nbytes=(1 << 24) if args.quick else None)
    cases = [(b, dt, "greedy", {}) for b in (1, 16) for dt in (torch.float32, torch.bfloat16)]
    cases.append((1, torch.bfloat16, "t0.8,k50,p0.9", dict(temperature=0.8, top_k=50, top_p=0.9)))
    rows = []
    for batch, dtype, name, sampling in cases:
        ours, op, ref, nbytes = bench_case(args.device, batch, vocab, dtype, sampling, repeats)
        rows.append({
            "shape": f"[{batch},{BLOCK},{vocab}]", "dtype": str(dtype).replace("torch.", ""), "mode": name,
            "ours_ms": ours * 1e3, "op_ms": op * 1e3, "ref_ms": ref * 1e3, "speedup": ref / ours,
            "op_speedup": ref / op, "GB/s": nbytes / op / 1e9, "frac_peak_bw": nbytes / op / bandwidth,
        })
    per_seq_rows = [bench_per_seq(args.device, 16, vocab, torch.bfloat16, mode, repeats) for mode in ("sampled", "mixed")]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"commit_tokens on {device_name}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print_table(rows)
    print()
    print_table(per_seq_rows)
    print_json({"benchmark": "commit_tokens", "device": device_name, "peak_bandwidth_GBps": bandwidth / 1e9,
                "quick": args.quick, "rows": rows, "per_seq_rows": per_seq_rows})


if __name__ == "__main__":
    main()
