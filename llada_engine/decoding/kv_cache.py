"""A contiguous per-sequence KV cache for block-diffusion decoding.

k[layer], v[layer]: [B, S_max, Hkv, D]; seqlens int32 [B]: how many leading positions of each slot hold
finished tokens. Only whole blocks are ever written, so the cache always ends on a block boundary.
host_seqlens() is seqlens on the CPU, copied once after each change, for the attention of every layer: the
op validates lengths given on the CPU without a device synchronisation.
"""
from typing import Optional

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._host_seqlens: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    def host_seqlens(self) -> torch.Tensor:
        if self._host_seqlens is None:
            self._host_seqlens = self.seqlens.cpu().clone()
        return self._host_seqlens

    def set_lengths(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        self.seqlens[rows] = lengths.to(torch.int32)
        self._host_seqlens = None

    def write_block(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [W, Lb, Hkv, D] at positions seqlens[rows] + [0, Lb) of the slots `rows` [W]."""
        positions = self.seqlens[rows].long()[:, None] + torch.arange(k.shape[1], device=k.device)  # [W, Lb]
        self.k[layer][rows[:, None], positions] = k
        self.v[layer][rows[:, None], positions] = v

    def advance(self, rows: torch.Tensor, count: int) -> None:
        self.seqlens[rows] += count
        self._host_seqlens = None

    def keep(self, rows: torch.Tensor) -> None:
        """Compacts the cache to the slots `rows` (in that order): finished sequences leave the batch."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.seqlens = self.seqlens[rows]
        self._host_seqlens = None
