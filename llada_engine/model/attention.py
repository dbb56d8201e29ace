"""How the attention layers attend during one model call: a context object per call.

    PackedContext   sequences packed without padding ([T] tokens, cu_seqlens), block_attention under a mask;
                    with a cache it also stores every token's K/V at its sequence's slot (prefill).
    CachedContext   the current block of each of B sequences ([B * Lb] tokens) against that sequence's
                    cached K/V plus the block's own, through block_attention_decode; `write_rows` selects the
                    sequences whose block is final and gets written into the cache after the layer.
"""
from typing import Optional

import torch



class PackedContext:
    def __init__(self, ops, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int, mask: str,
                 cache=None, cache_rows: Optional[torch.Tensor] = None,
                 cache_positions: Optional[torch.Tensor] = None):
        self.ops = ops
        self.cu_seqlens = cu_seqlens            # int32 [S + 1]
        self.max_seqlen = max_seqlen
        self.block_size = block_size
        self.mask = mask
        self.cache = cache
        self.cache_rows = cache_rows            # int64 [T]: cache slot of each token
        self.cache_positions = cache_positions  # int64 [T]: position of each token in its sequence

    def attend(self, q, k, v, layer: int, scale: float) -> torch.Tensor:
        if self.cache is not None:
            self.cache.k[layer][self.cache_rows, self.cache_positions] = k
            self.cache.v[layer][self.cache_rows, self.cache_positions] = v
        return self.ops.block_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                        block_size=self.block_size, mask=self.mask, softmax_scale=scale)


class CachedContext:
    def __init__(self, ops, cache, batch: int, block: int, write_rows: Optional[torch.Tensor] = None):
        self.ops = ops
        self.cache = cache
        self.batch = batch
        self.block = block
        self.write_rows = write_rows            # int64 [W]: slots whose block is written into the cache

    def attend(self, q, k, v, layer: int, scale: float) -> torch.Tensor:
        B, Lb = self.batch, self.block
        q4, k4, v4 = (t.view(B, Lb, t.shape[1], t.shape[2]) for t in (q, k, v))   # [B, Lb, heads, D]
        lengths = self.cache.host_seqlens()                                            # int32 [B], on the CPU
        out = self.ops.block_attention_decode(q4, self.cache.k[layer], self.cache.v[layer], lengths, k4, v4,
                                              softmax_scale=scale)                   # [B, Lb, Hq, D]
        if self.write_rows is not None and self.write_rows.numel():
            self.cache.write_block(layer, self.write_rows, k4[self.write_rows], v4[self.write_rows])
        return out.reshape(B * Lb, q.shape[1], q.shape[2])
