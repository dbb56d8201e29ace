"""How the attention layers attend during one model call: a context object per call.

    PackedContext   sequences packed without padding ([T] tokens, cu_seqlens), block_attention under a mask;
                    with a cache it also stores every token's K/V at its flat cache slot (prefill).
    PagedContext    the current block of each of B sequences ([B * Lb] tokens) against that sequence's cached
                    K/V in the paged cache plus the block's own, through block_attention_decode; every row's
                    K/V is stored at the slot the cache chose for it (a sequence's next page when its block is
                    final, the scratch page otherwise).
The cache is only ever touched through its `update` and its page pools; the contexts hold no state of it.
"""
from typing import Optional

import torch


class PackedContext:
    def __init__(self, ops, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int, mask: str,
                 cache=None, cache_slots: Optional[torch.Tensor] = None):
        self.ops = ops
        self.cu_seqlens = cu_seqlens            # int32 [S + 1]
        self.max_seqlen = max_seqlen
        self.block_size = block_size
        self.mask = mask
        self.cache = cache
        self.cache_slots = cache_slots          # int64 [T]: flat cache slot of each token

    def attend(self, q, k, v, layer: int, scale: float) -> torch.Tensor:
        if self.cache is not None:
            self.cache.update(layer, k, v, self.cache_slots)
        return self.ops.block_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                        block_size=self.block_size, mask=self.mask, softmax_scale=scale)


class PagedContext:
    def __init__(self, ops, cache, batch, block_length: int):
        self.ops = ops
        self.cache = cache
        self.batch = batch                      # a PagedBatch on the model's device
        self.block_length = block_length

    def attend(self, q, k, v, layer: int, scale: float) -> torch.Tensor:
        Lb = self.block_length
        B = q.shape[0] // Lb
        self.cache.update(layer, k, v, self.batch.write_slots)
        q4, k4, v4 = (t.view(B, Lb, t.shape[1], t.shape[2]) for t in (q, k, v))   # [B, Lb, heads, D]
        out = self.ops.block_attention_decode(q4, self.cache.k_pages[layer], self.cache.v_pages[layer],
                                              self.batch.seqlens, k4, v4, softmax_scale=scale,
                                              block_table=self.batch.block_table)   # [B, Lb, Hq, D]
        return out.reshape(B * Lb, q.shape[1], q.shape[2])
