"""Benchmark of the MoE ops: routing and the routed experts of one layer (moe_experts), forward and
forward + backward, ours (batch-invariant, the default, and fast) against the official loop over experts
(moe_experts_ref), the plain per-expert loop of torch matmuls (`loop`: x[t] @ w13[e].T, SiLU-gate,
@ w2[e].T, index_add_) and a composite of torch ops around torch._grouped_mm (the strongest peer in
PyTorch).

    python -m benchmarks.moe [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16] [--tokens 32,512]

The CPU kernels use OpenMP: on a machine shared with other jobs, times swing widely (check the load).

Shapes: on CUDA LLaDA2.0-mini's (E 256, k 8, H 2048, I 512, n_group 8, topk_group 4) at T in
{32, 512, 4096, 16384}; on the CPU reduced ones (E 64, H 512, I 256) at T in {32, 512, 2048}.
The experts see uniform random routing (k distinct experts per token, random weights). FLOPs of
moe_experts: 6 T k H I forward, twice that more for the backward. vs_loop: the loop's time over ours.
Prints a table, then one JSON line (last).
"""
import argparse

import torch
import torch.nn.functional as F

from llada_engine.ops import moe_experts, moe_experts_ref, moe_route, moe_route_ref

from .timer import cpu_model, peak_flops, print_json, print_table, time_fn

SHAPES = {
    "cuda": dict(E=256, k=8, H=2048, I=512, n_group=8, topk_group=4, tokens=[32, 512, 4096, 16384]),
    "cpu": dict(E=64, k=8, H=512, I=256, n_group=8, topk_group=4, tokens=[32, 512, 2048]),
}


def experts_grouped_mm(x, topk_ids, topk_weights, w13, w2):
    """The routed experts composed from torch ops around torch._grouped_mm."""
    T, k = topk_ids.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices                       # [T*k]
    offs = torch.bincount(flat, minlength=E).cumsum(0).int()            # [E] end offsets
    token = order // k
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)    # [T*k, 2I]
    y = torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(1, 2), offs=offs)
    weighted = y.float() * topk_weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, weighted).to(x.dtype)


def experts_loop(x, topk_ids, topk_weights, w13, w2):
    """The plain per-expert loop of torch matmuls, accumulated in fp32 by index_add_."""
    I = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        t, slot = torch.where(topk_ids == e)
        if t.numel() == 0:
            continue
        h = x[t] @ w13[e].T
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].T
        out.index_add_(0, t, y.float() * topk_weights[t, slot, None])
    return out.to(x.dtype)


def experts_fast(x, topk_ids, topk_weights, w13, w2):
    return moe_experts(x, topk_ids, topk_weights, w13, w2, batch_invariant=False)


def uniform_routing(T, s, device, seed=0):
    """k distinct experts per token, uniformly at random, and normalised random weights."""
    g = torch.Generator(device=device).manual_seed(seed + 1)
    ids = torch.rand(T, s["E"], device=device, generator=g).argsort(dim=1)[:, :s["k"]].int()
    weights = torch.rand(T, s["k"], device=device, generator=g)
    return ids, weights / weights.sum(1, keepdim=True)


def make_inputs(T, s, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, s["E"], device=device, generator=g) * 2
    bias = torch.randn(s["E"], device=device, generator=g) * 0.1
    x = torch.randn(T, s["H"], device=device, generator=g).to(dtype)
    w13 = (torch.randn(s["E"], 2 * s["I"], s["H"], device=device, generator=g) / s["H"] ** 0.5).to(dtype)
    w2 = (torch.randn(s["E"], s["H"], s["I"], device=device, generator=g) / s["I"] ** 0.5).to(dtype)
    return logits, bias, x, w13, w2


def forward_backward(fn, x, ids, weights, w13, w2, grad):
    leaves = [t.detach().requires_grad_() for t in (x, weights, w13, w2)]

    def run():
        out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
        torch.autograd.grad(out, leaves, grad)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first token count and dtype, few repeats: seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default bfloat16 on CUDA, both on CPU")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts T")
    args = parser.parse_args()
    device = args.device
    s = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    dtypes = args.dtypes or ("bfloat16" if device.startswith("cuda") else "float32,bfloat16")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else s["tokens"]
    if args.quick:
        tokens, dtypes = tokens[:1], dtypes[:1]
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    route_kw = dict(top_k=s["k"], n_group=s["n_group"], topk_group=s["topk_group"], routed_scaling_factor=2.5)

    peaks = {str(d).replace("torch.", ""): peak_flops(device, d) for d in dtypes}
    rows = []
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        peak = peaks[name]
        for T in tokens:
            logits, bias, x, w13, w2 = make_inputs(T, s, device, dtype)
            ids, weights = uniform_routing(T, s, device)
            grad = torch.randn_like(x)
            flops = 6 * T * s["k"] * s["H"] * s["I"]

            def add(op, impl, fn, op_flops):
                try:
                    seconds = time_fn(fn, device=device, warmup=warmup, repeats=repeats)
                except (RuntimeError, NotImplementedError) as error:
                    if impl != "grouped_mm":  # only the peer may lack a path (torch._grouped_mm on a device)
                        raise
                    print(f"# {op} {impl} T={T} {name}: skipped ({str(error).splitlines()[0]})")
                    return
                rows.append(dict(op=op, T=T, dtype=name, impl=impl, ms=seconds * 1e3,
                                 tflops=op_flops / seconds / 1e12 if op_flops else None,
                                 frac_peak=op_flops / seconds / peak if op_flops else None))

            if dtype == dtypes[0]:
                add("route", "ours", lambda: moe_route(logits, bias, **route_kw), 0)
                add("route", "reference", lambda: moe_route_ref(logits, bias, **route_kw), 0)
            impls = [("ours", moe_experts), ("ours_fast", experts_fast), ("loop", experts_loop),
                     ("reference", moe_experts_ref), ("grouped_mm", experts_grouped_mm)]
            for impl, fn in impls:
                add("experts_fwd", impl, lambda fn=fn: fn(x, ids, weights, w13, w2), flops)
            for impl, fn in impls:
                add("experts_fwd_bwd", impl, forward_backward(fn, x, ids, weights, w13, w2, grad), 3 * flops)

    for r in rows:
        peers = {q["impl"]: q["ms"] for q in rows if q["op"] == r["op"] and q["T"] == r["T"] and q["dtype"] == r["dtype"]}
        r["vs_ref"] = peers["reference"] / r["ms"]
        r["vs_loop"] = peers["loop"] / r["ms"] if "loop" in peers else None
    print(f"# device: {torch.cuda.get_device_name() if device.startswith('cuda') else cpu_model()}, "
          f"threads: {torch.get_num_threads()}, measured peak TFLOP/s: "
          + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in peaks.items()))
    print_table(rows)
    print_json(dict(benchmark="moe", device=device, cpu=cpu_model(), threads=torch.get_num_threads(), shapes={k: v for k, v in s.items() if k != "tokens"},
                    peak_tflops={k: v / 1e12 for k, v in peaks.items()}, results=rows))


if __name__ == "__main__":
    main()
