"""Varlen document-masked block attention (docs/ARCHITECTURE.md, Block attention): prefill, decoding and
block-diffusion training.

    block_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, block_size,
                    mask="block_causal", softmax_scale=None, return_lse=False, kernel=None) -> out [, lse]
    block_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, *, softmax_scale=None,
                           return_lse=False, block_table=None) -> out [, lse]
    block_attention_ref / block_attention_decode_ref   # dense-mask SDPA per document: oracle and baseline
    block_mask_dense(mask, block_size, len_q, len_k)   # the mask of one document as a bool matrix

Packed layout (T tokens, S sequences): q [Tq, Hq, D], k and v [Tk, Hkv, D], cu_seqlens_q/k int32 [S + 1];
each sequence is one document and nothing attends across documents; Hq is a multiple of Hkv (GQA).
lse is fp32 [Tq, Hq]. A query that sees no key gets out = 0 and lse = -inf.
Non-finite inputs propagate as in softmax and logsumexp over the scores of the keys the mask keeps (a masked
key contributes nothing, whatever its values): a query with a NaN score gets out NaN and lse NaN; else one
with a +inf score gets out NaN and lse +inf; a score of -inf weighs 0, so a query whose every kept score is
-inf sees no key (out 0, lse -inf). A NaN or inf in v makes NaN or inf the out of the queries that weigh it,
and possibly of other queries of its document (0 * inf in the products); never of another document. The
gradients follow: a query with a NaN or inf lse gets NaN in dq and in the dk, dv of the keys it sees; the
other gradients of its document may be NaN too (0 * NaN in the products), those of other documents are not.
Masks (pos = position in its sequence, blk(p) = p // block_size):
  block_causal  queries bottom-right aligned (q_pos = i + len_k - len_q); k visible iff blk(k_pos) <= blk(q_pos).
  bd3           each sequence is [x_t | x_0] of n + n tokens, blocks counted within each half: a noisy query
                sees the noisy keys of its own block and the clean keys of strictly earlier blocks; a clean
                query sees the clean keys of its own and earlier blocks, never a noisy key.
block_attention is differentiable in q, k and v (and through lse). On CUDA, `kernel` picks the forward:
"hopper" (wgmma + TMA, sm_90a builds on H100/H200, 16-byte aligned rows), "flash2" (any sm_80+ GPU) or
"auto" (flash2 until hopper passes the GPU tests; the default, unless LLADA_ATTENTION_KERNEL is set); the
backward's main kernel follows the same choice.

The decode form: the current block of every sequence, q / k_new / v_new [B, Lb, H, D], sees the first
cache_seqlens[b] rows of its cache and all Lb new keys (no mask inside the block); nothing is copied into the
cache. Without block_table the cache is contiguous, k_cache / v_cache [B, Smax, Hkv, D]. With block_table
(int32 [B, max_pages]) it is paged: k_cache / v_cache are page pools [num_pages, page_size, Hkv, D] (page_size
any multiple of 8) and sequence b's cached row r is row r % page_size of page block_table[b, r // page_size];
only the first ceil(cache_seqlens[b] / page_size) entries of row b are read (the rest may hold anything, e.g.
-1), pages may be shared, in any order, or owned by no sequence. Both forms give the same bits on the CPU.
cache_seqlens (int32 [B]) and block_table may live on the CPU with the rest on a GPU: they are validated
there and uploaded without waiting for the device (pinned memory; inside a CUDA graph capture pass device
tensors, whose values the graph then reads at each replay).
What is validated where the values are (nothing here waits for a GPU, except the contiguous form given GPU
cache_seqlens, which it copies to the host once per call to validate):
  cache_seqlens on the CPU: each in [0, Smax] (contiguous) or [0, max_pages * page_size] (paged);
  block_table on the CPU with cache_seqlens on the CPU: every entry a sequence reads is in [0, num_pages);
  paged index tensors on the GPU: only shapes and dtypes. Their values are trusted: a length outside
  [0, max_pages * page_size] is clamped into it and a page id outside [0, num_pages) to the nearest page, so
  nothing outside the pools is read, but the result is then unspecified.
On CUDA, keys past 512 (the cache plus the block) are split into runs of a fixed 512 keys whose partial
results are merged (split-KV); the cut positions follow only the key index, never the batch or the GPU, so a
sequence gets the same bits alone or in any batch.
"""
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .._extension import kernels_available, require_kernels
from .checks import check_dims, check_same_device, check_tensors

MASKS = ("block_causal", "bd3")


def _softmax_scale(softmax_scale: Optional[float], q: torch.Tensor) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"block_attention: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, block_size: int,
                    mask: str = "block_causal", softmax_scale: Optional[float] = None, return_lse: bool = False,
                    kernel: Optional[str] = None):
    """Block attention over packed documents (see the module doc): out [Tq, Hq, D] (and lse [Tq, Hq]).
    `kernel` picks the CUDA kernels: "auto", "flash2" or "hopper" (the CPU takes "auto" only); None means
    $LLADA_ATTENTION_KERNEL on CUDA when set, else "auto"."""
    require_kernels("block_attention")
    check_tensors("block_attention", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if kernel is None:
        kernel = os.environ.get("LLADA_ATTENTION_KERNEL", "auto") if q.is_cuda else "auto"
    out, lse = torch.ops.llada.block_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size=block_size, mask=mask,
        softmax_scale=_softmax_scale(softmax_scale, q), kernel=kernel)
    return (out, lse) if return_lse else out


def block_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
                           softmax_scale: Optional[float] = None, return_lse: bool = False,
                           block_table: Optional[torch.Tensor] = None):
    """The current block against a contiguous cache, or a paged one with block_table (see the module doc):
    out [B, Lb, Hq, D] (and lse [B, Lb, Hq])."""
    require_kernels("block_attention_decode")
    check_tensors("block_attention_decode", q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                  k_new=k_new, v_new=v_new, **({} if block_table is None else dict(block_table=block_table)))
    out, lse = torch.ops.llada.block_attention_decode(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale=_softmax_scale(softmax_scale, q),
        block_table=block_table)
    return (out, lse) if return_lse else out


def block_mask_dense(mask: str, block_size: int, len_q: int, len_k: int, device=None) -> torch.Tensor:
    """The mask of one document: bool [len_q, len_k], True where query i sees key j."""
    if mask not in MASKS:
        raise ValueError(f'block_attention: mask must be "block_causal" or "bd3", got "{mask}"')
    if block_size < 1:
        raise ValueError(f"block_attention: block_size must be >= 1, got {block_size}")
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    if mask == "block_causal":
        return j.div(block_size, rounding_mode="floor") <= (i + len_k - len_q).div(block_size, rounding_mode="floor")
    if len_q != len_k or len_q % 2:
        raise ValueError(f'block_attention: mask "bd3" needs [x_t | x_0] sequences of even length with equal query '
                         f"and key lengths, got {len_q} queries and {len_k} keys")
    n = len_q // 2
    q_clean, k_clean = i >= n, j >= n
    bq = (i - n * q_clean) // block_size
    bk = (j - n * k_clean) // block_size
    return torch.where(q_clean, k_clean & (bk <= bq), torch.where(k_clean, bk < bq, bk == bq))


def _attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                  return_lse: bool):
    """q [Hq, Lq, D], k/v [Hkv, Lk, D], keep bool [Lq, Lk] -> out [Lq, Hq, D], lse [Lq, Hq] or None."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = None
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        # SDPA adds its mask to the scores, so a NaN or inf score of a masked key would reach the row: mask by
        # replacing instead, and count a row as seeing a key when one of its kept scores is above -inf (or NaN).
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # [Hq, Lq, Lk]
        masked = scores.masked_fill(~keep, float("-inf"))
        seen = ((masked > float("-inf")) | masked.isnan()).any(-1)   # [Hq, Lq]
        out = (torch.softmax(masked, -1) @ v.to(acc)).to(v.dtype)
        out = torch.where(seen[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    else:
        seen = keep.any(-1)                                         # [Lq]
        # Rows that see no key attend to everything inside SDPA (no NaN) and are zeroed after.
        # 4-D inputs: the CPU's fused SDPA kernel takes [B, H, L, D] only (3-D would fall back to the math path).
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=keep | ~seen[:, None],
                                             scale=scale)[0]
        out = torch.where(seen[None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    lse = None
    if return_lse:
        if scores is None:
            scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # [Hq, Lq, Lk]
        lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1).transpose(0, 1)
    return out.transpose(0, 1), lse


def block_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                        max_seqlen_k: Optional[int] = None, *, block_size: int, mask: str = "block_causal",
                        softmax_scale: Optional[float] = None, return_lse: bool = False):
    """Pure-PyTorch reference of block_attention: SDPA per document over its dense boolean mask, in the
    inputs' dtype (fp32 or fp64 for an oracle); differentiable through torch autograd. lse is computed in
    at least fp32."""
    scale = _softmax_scale(softmax_scale, q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        len_q, len_k = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        keep = block_mask_dense(mask, block_size, len_q, len_k, device=q.device)
        if len_q == 0:
            continue
        if len_k == 0:
            outs.append(q.new_zeros(len_q, q.shape[1], v.shape[2]))
            lses.append(torch.full((len_q, q.shape[1]), float("-inf"), device=q.device))
            continue
        out, lse = _attend_dense(q[cq[s]:cq[s + 1]].transpose(0, 1), k[ck[s]:ck[s + 1]].transpose(0, 1),
                                 v[ck[s]:ck[s + 1]].transpose(0, 1), keep, scale, return_lse)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[2])
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else torch.empty(0, q.shape[1], device=q.device)
    return out, lse


def _cached_rows(cache: torch.Tensor, b: int, cached: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """The first `cached` rows of sequence b: [cached, Hkv, D]."""
    if block_table is None:
        return cache[b, :cached]
    page_size = cache.shape[1]
    pages = block_table[b, :-(-cached // page_size)].long().to(cache.device)
    return cache[pages].flatten(0, 1)[:cached]


def block_attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
                               softmax_scale: Optional[float] = None, return_lse: bool = False,
                               block_table: Optional[torch.Tensor] = None):
    """Pure-PyTorch reference of block_attention_decode: per sequence, SDPA over its cached rows (gathered
    from its pages with block_table) + the new keys."""
    scale = _softmax_scale(softmax_scale, q)
    outs, lses = [], []
    for b, cached in enumerate(cache_seqlens.tolist()):
        keys = torch.cat([_cached_rows(k_cache, b, cached, block_table), k_new[b]]).transpose(0, 1)
        values = torch.cat([_cached_rows(v_cache, b, cached, block_table), v_new[b]]).transpose(0, 1)
        keep = torch.ones(q.shape[1], keys.shape[1], dtype=torch.bool, device=q.device)
        out, lse = _attend_dense(q[b].transpose(0, 1), keys, values, keep, scale, return_lse)
        outs.append(out)
        lses.append(lse)
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if return_lse else out


if kernels_available():
    @torch.library.register_fake("llada::block_attention_fwd")
    def _block_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, block_size,
                                  mask, softmax_scale, kernel="auto"):
        check_dims("block_attention", q=(q, "[Tq, Hq, D]"), k=(k, "[Tk, Hkv, D]"), v=(v, "[Tk, Hkv, D]"),
                   cu_seqlens_q=(cu_seqlens_q, "[S + 1]"), cu_seqlens_k=(cu_seqlens_k, "[S + 1]"))
        check_same_device("block_attention", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        return (q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32))

    @torch.library.register_fake("llada::block_attention_bwd")
    def _block_attention_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, *, block_size, mask, softmax_scale, kernel="auto"):
        check_dims("block_attention_bwd", dout=(dout, "[Tq, Hq, D]"), q=(q, "[Tq, Hq, D]"), k=(k, "[Tk, Hkv, D]"),
                   v=(v, "[Tk, Hkv, D]"), out=(out, "[Tq, Hq, D]"), lse=(lse, "[Tq, Hq]"),
                   cu_seqlens_q=(cu_seqlens_q, "[S + 1]"), cu_seqlens_k=(cu_seqlens_k, "[S + 1]"))
        check_same_device("block_attention_bwd", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          dout=dout, out=out, lse=lse, dlse=dlse)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("llada::block_attention_decode")
    def _block_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, *, softmax_scale,
                                     block_table=None):
        op = "block_attention_decode"
        cache = "[num_pages, page_size, Hkv, D]" if block_table is not None else "[B, Smax, Hkv, D]"
        check_dims(op, q=(q, "[B, Lb, Hq, D]"), k_cache=(k_cache, cache), v_cache=(v_cache, cache),
                   cache_seqlens=(cache_seqlens, "[B]"), k_new=(k_new, "[B, Lb, Hkv, D]"),
                   v_new=(v_new, "[B, Lb, Hkv, D]"))
        check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
        if block_table is not None:
            check_dims(op, block_table=(block_table, "[B, max_pages]"))
        for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table)):
            if t is not None and t.device.type != "cpu":   # (either may also be on the CPU)
                check_same_device(op, q=q, **{name: t})
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    def _setup_context(ctx, inputs, keyword_only_inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
        ctx.options = keyword_only_inputs

    def _backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.llada.block_attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                                         *ctx.max_seqlen, **ctx.options)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd("llada::block_attention_fwd", _backward, setup_context=_setup_context)
