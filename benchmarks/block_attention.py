"""Block attention (docs/ARCHITECTURE.md, Block attention) timed: ours against the dense-mask reference
(SDPA per document over a boolean mask) and, on a GPU, FlexAttention with the equivalent block mask; forward
and backward, masks bd3 and block_causal, LLaDA2.0 heads (Hq 16, Hkv 4, D 128), packed documents of mixed
lengths.

    python -m benchmarks.block_attention [--quick] [--tokens 4096 8192 16384] [--dtype float32|bfloat16]
                                         [--decode-cache 4096] [--decode-only]

TFLOP/s count only the work the mask keeps (4 D flops per kept (query, key, head) forward, 2.5x that
backward); `peak` is the fraction of this machine's measured matmul FLOP/s in the same dtype.
The decode form (block_attention_decode: a block of 32 queries per sequence against a cache of
--decode-cache rows, batches 1 and 16) is memory-bound: GB/s count the bytes it must move (the cached K and
V, q, the new K and V, the output once each), `of_bw` is the fraction of the copy bandwidth measured in the
same run; the peer is SDPA over the cache concatenated with the block's keys (what a cache without an
in-place decode form does), cache_seqlens given from the CPU (no device synchronisation per call).
The paged form runs the same case with the cache in shuffled pages of 32 rows (one block) of a shared pool:
`ours_paged` with cache_seqlens and block_table from the CPU (validated there, uploaded per call), on a GPU
also `ours_paged_dev` with both already on the device (trusted, nothing uploaded); `paged_vs_contiguous` in
the JSON is ours' time over ours_paged's (1.0: paging costs nothing).
Prints the tables, then one JSON line (last).
"""
import argparse
import platform

import torch

import torch.nn.functional as F

from benchmarks.timer import peak_bandwidth, peak_flops, print_json, print_table, time_fn
from llada_engine.ops import block_attention, block_attention_decode, block_attention_ref, block_mask_dense

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK_SIZE = 16, 4, 128, 32


def document_lengths(total: int) -> list[int]:
    """Mixed document lengths summing to `total` (a multiple of 64): halves down to 1/32, even lengths."""
    lengths, left = [], total
    for share in (2, 4, 8, 16, 32):
        lengths.append(total // share)
        left -= total // share
    lengths.append(left)
    return lengths


def kept_pairs(mask: str, lengths: list[int]) -> int:
    return sum(int(block_mask_dense(mask, BLOCK_SIZE, n, n).sum()) for n in lengths)


def flex_attention_fn(mask: str, lengths: list[int], device: str):
    """FlexAttention with the same document + block mask (GPU only), or None where torch lacks it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # The timed backward replays one graph (retain_graph), which a compiled backward with donated buffers refuses.
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    start = torch.tensor([0] + lengths, device=device).cumsum(0)[:-1][doc]
    half = torch.tensor(lengths, device=device)[doc] // 2
    pos = torch.arange(len(doc), device=device) - start

    def block_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (pos[ki] // BLOCK_SIZE <= pos[qi] // BLOCK_SIZE)

    def bd3(b, h, qi, ki):
        n = half[qi]
        q_clean, k_clean = pos[qi] >= n, pos[ki] >= n
        bq, bk = (pos[qi] - n * q_clean) // BLOCK_SIZE, (pos[ki] - n * k_clean) // BLOCK_SIZE
        keep = torch.where(q_clean, k_clean & (bk <= bq), torch.where(k_clean, bk < bq, bk == bq))
        return (doc[qi] == doc[ki]) & keep

    T = len(doc)
    block_mask = create_block_mask(bd3 if mask == "bd3" else block_causal, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # [T, H, D] -> [1, H, T, D]
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)
    return run


def bench_case(mask: str, total: int, device: str, dtype: torch.dtype, repeats: int, peak: float) -> list[dict]:
    lengths = document_lengths(total)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, HEADS_Q, HEAD_DIM, generator=g).to(device, dtype)
    k = torch.randn(total, HEADS_KV, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(total, HEADS_KV, HEAD_DIM, generator=g).to(device, dtype)
    dout = torch.randn(total, HEADS_Q, HEAD_DIM, generator=g).to(device, dtype)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    args = (cu, cu, max(lengths), max(lengths))
    kw = dict(block_size=BLOCK_SIZE, mask=mask)
    fwd_flops = 4 * HEAD_DIM * HEADS_Q * kept_pairs(mask, lengths)
    timing = dict(device=device, warmup=1, repeats=repeats)

    def with_grad(fn):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg)
        return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    impls = {"ours": lambda a, b, c: block_attention(a, b, c, *args, **kw),
             "dense_ref": lambda a, b, c: block_attention_ref(a, b, c, *args, **kw)}
    if device.startswith("cuda"):
        # "ours" runs the kernels kernel="auto" picks (flash2, until the Hopper ones pass the GPU tests on a card);
        # on sm_90 this one the Hopper kernels.
        if torch.cuda.get_device_capability(device) == (9, 0):
            impls["ours_hopper"] = lambda a, b, c: block_attention(a, b, c, *args, kernel="hopper", **kw)
        flex = flex_attention_fn(mask, lengths, device)
        if flex is not None:
            impls["flex"] = flex
    rows = []
    for name, fn in impls.items():
        for direction, run, flops in (("fwd", lambda: fn(q, k, v), fwd_flops), ("bwd", None, 2.5 * fwd_flops)):
            seconds = time_fn(run or with_grad(fn), **timing)
            rows.append(dict(impl=name, mask=mask, tokens=total, docs=len(lengths), dir=direction,
                             ms=seconds * 1e3, tflops=flops / seconds / 1e12, peak=flops / seconds / peak))
    return rows


def bench_decode(batch: int, cached: int, device: str, dtype: torch.dtype, repeats: int,
                 bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    q = rand(batch, BLOCK_SIZE, HEADS_Q, HEAD_DIM)                                   # [B, Lb, Hq, D]
    k_new, v_new = rand(batch, BLOCK_SIZE, HEADS_KV, HEAD_DIM), rand(batch, BLOCK_SIZE, HEADS_KV, HEAD_DIM)
    pages = -(-(cached + BLOCK_SIZE) // BLOCK_SIZE)                                  # per sequence, one block each
    k_cache, v_cache = (rand(batch, pages * BLOCK_SIZE, HEADS_KV, HEAD_DIM) for _ in range(2))  # [B, Smax, Hkv, D]
    lens = torch.full((batch,), cached, dtype=torch.int32)
    table = torch.randperm(batch * pages, generator=g).view(batch, pages).to(torch.int32)  # [B, max_pages]
    k_pool, v_pool = (torch.empty(batch * pages, BLOCK_SIZE, HEADS_KV, HEAD_DIM, device=device, dtype=dtype)
                      for _ in range(2))                                             # [num_pages, page, Hkv, D]
    for pool, cache in ((k_pool, k_cache), (v_pool, v_cache)):
        pool[table.view(-1).long().to(device)] = cache.reshape(batch * pages, BLOCK_SIZE, HEADS_KV, HEAD_DIM)
    moved = q.element_size() * (2 * batch * cached * HEADS_KV * HEAD_DIM + 2 * q.numel() + 2 * k_new.numel())

    def sdpa_cat():  # [B, H, L, D] views; the cache rows and the block's keys concatenated first
        keys = torch.cat([k_cache[:, :cached], k_new], 1).transpose(1, 2)
        values = torch.cat([v_cache[:, :cached], v_new], 1).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True).transpose(1, 2)
    impls = {"ours": lambda: block_attention_decode(q, k_cache, v_cache, lens, k_new, v_new),
             "ours_paged": lambda: block_attention_decode(q, k_pool, v_pool, lens, k_new, v_new, block_table=table),
             "sdpa_cat": sdpa_cat}
    if device.startswith("cuda"):
        lens_dev, table_dev = lens.to(device), table.to(device)
        impls["ours_paged_dev"] = lambda: block_attention_decode(q, k_pool, v_pool, lens_dev, k_new, v_new,
                                                                 block_table=table_dev)
    rows = []
    for name, fn in impls.items():
        seconds = time_fn(fn, device=device, warmup=1, repeats=repeats)
        rows.append(dict(impl=name, batch=batch, cached=cached, block=BLOCK_SIZE, ms=seconds * 1e3,
                         gbps=moved / seconds / 1e9, of_bw=moved / seconds / bandwidth))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, seconds")
    parser.add_argument("--tokens", type=int, nargs="+", help="packed tokens per batch (multiples of 64)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-cache", type=int, help="cached rows per sequence in the decode-form case")
    parser.add_argument("--decode-only", action="store_true", help="only the decode form (contiguous and paged)")
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    tokens = opts.tokens or ([2048] if opts.quick else ([4096, 8192, 16384] if opts.device != "cpu" else [4096, 8192]))
    repeats = 1 if opts.quick else 3
    peak = peak_flops(opts.device, dtype)
    rows = []
    for total in [] if opts.decode_only else tokens:
        for mask in ("bd3", "block_causal"):
            rows += bench_case(mask, total, opts.device, dtype, repeats, peak)
    print_table(rows)
    bandwidth = peak_bandwidth(opts.device)
    cached = opts.decode_cache or (512 if opts.quick else 4096)
    decode_rows = [r for batch in (1, 16) for r in bench_decode(batch, cached, opts.device, dtype, repeats, bandwidth)]
    print()
    print_table(decode_rows)
    paged_vs_contiguous = {}
    for r in decode_rows:
        if r["impl"].startswith("ours_paged"):
            contiguous = next(x for x in decode_rows if x["impl"] == "ours" and x["batch"] == r["batch"])
            paged_vs_contiguous[f"{r['impl']}_batch{r['batch']}"] = contiguous["ms"] / r["ms"]
    speedup = {"dense_ref": {}, "flex": {}}
    for r in rows:
        for peer, ratios in speedup.items():
            same = [x for x in rows if x["impl"] == peer and all(x[c] == r[c] for c in ("mask", "tokens", "dir"))]
            if r["impl"] == "ours" and same:
                ratios[f"{r['mask']}_{r['tokens']}_{r['dir']}"] = same[0]["ms"] / r["ms"]
    print_json({"benchmark": "block_attention", "device": opts.device,
                "device_name": torch.cuda.get_device_name() if opts.device.startswith("cuda") else platform.processor(),
                "threads": torch.get_num_threads(), "dtype": opts.dtype, "peak_tflops": peak / 1e12,
                "heads_q": HEADS_Q, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                "speedup_vs_dense_ref": speedup["dense_ref"], "speedup_vs_flex": speedup["flex"], "rows": rows,
                "copy_gbps": bandwidth / 1e9, "decode_rows": decode_rows,
                "paged_vs_contiguous": paged_vs_contiguous})


if __name__ == "__main__":
    main()
