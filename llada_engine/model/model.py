"""The LLaDA2.0 model: embeddings, decoder layers, final norm and the untied lm_head (docs/ARCHITECTURE.md, Model).

    model(input_ids, cu_seqlens=None, *, block_size, mask="block_causal", logits_at=None) -> logits fp32 [T, V]
    (or [N, V] for the N token indices `logits_at`: training needs the logits of a few tokens only)

`input_ids` int64 [T] packs one or more sequences (cu_seqlens int32 [S+1]); positions restart at 0 in each
sequence (under mask="bd3" each half [x_t | x_0] takes positions 0..n-1). Tokens are predicted at their own
position. Decoding uses `prefill` and `forward_paged` with the paged KV cache (llada_engine/decoding).
The parameter names are the release's, except the routed experts, which are stacked per layer
(`mlp.w13` [E, 2I, H], `mlp.w2` [E, H, I]); checkpoint.py maps them to the per-expert release names.
"""
from typing import Optional

import torch
from torch import nn

from .attention import PackedContext, PagedContext
from .backend import BACKENDS, op_set
from .config import LLaDA2Config
from .modules import DecoderLayer, RMSNorm, rotary_tables

MASKS = ("block_causal", "bd3")


class _Body(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2Model(nn.Module):
    def __init__(self, config: LLaDA2Config, backend: str = "kernels"):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._ops = op_set(value)
        self._backend = value

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, context) -> torch.Tensor:
        h = self.model.word_embeddings(input_ids)                                    # [T, H]
        cos, sin = rotary_tables(positions, self.config.rope_dim, self.config.rope_theta, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, context, self._ops)
        return self.model.norm(h)

    def _check_ids(self, input_ids: torch.Tensor, dims: int) -> None:
        if input_ids.dtype != torch.int64 or input_ids.dim() != dims:
            raise ValueError(f"input_ids must be an int64 tensor of {dims} dims, got {input_ids.dtype} "
                             f"of shape {list(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values in "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]")

    def forward(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *, block_size: int,
                mask: str = "block_causal", logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_ids(input_ids, 1)
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        T = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=input_ids.device)
        positions, max_seqlen = packed_positions(cu_seqlens, T, bd3=mask == "bd3")
        context = PackedContext(self._ops, cu_seqlens, max_seqlen, block_size, mask)
        h = self._hidden(input_ids, positions, context)                              # [T, H]
        return self.lm_head(h if logits_at is None else h[logits_at]).float()       # [T or N, V]

    def prefill(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor, max_seqlen: int,
                block_length: int, cache, cache_slots: torch.Tensor) -> None:
        """Runs packed prompt blocks (input_ids [T], cu_seqlens int32 [S+1], positions [T]) with block_causal
        and stores every token's K/V at its flat cache slot (int64 [T]). The caller validated the ids and
        built the positions on the host: nothing here waits for the device."""
        context = PackedContext(self._ops, cu_seqlens, max_seqlen, block_length, "block_causal", cache,
                                cache_slots)
        self._hidden(input_ids, positions, context)

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, batch) -> torch.Tensor:
        """Logits fp32 [B, Lb, V] of the current block of B sequences (input_ids [B, Lb], positions [B * Lb])
        against their pages of the KV cache (batch: a PagedBatch on the model's device); every row's K/V is
        stored at batch.write_slots. No value checks, no host synchronisation: the decode step's forward."""
        B, Lb = input_ids.shape
        context = PagedContext(self._ops, cache, batch, Lb)
        return self.lm_head(self._hidden(input_ids.reshape(-1), positions, context)).float().view(B, Lb, -1)

    def save_pretrained(self, path, *, max_shard_size="5GB", progress=None) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, progress=progress)


def packed_positions(cu_seqlens: torch.Tensor, total: int, *, bd3: bool) -> tuple[torch.Tensor, int]:
    """Position of each packed token in its sequence [T] (modulo the half length under bd3), and the
    longest sequence."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be an int32 tensor [S+1] with S >= 1, got {cu_seqlens.dtype} "
                         f"of shape {list(cu_seqlens.shape)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                              # [S]
    if cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != total or (lengths < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {total}, got {cu_seqlens.tolist()}")
    starts = cu_seqlens[:-1].long().repeat_interleave(lengths)                       # [T]
    positions = torch.arange(total, device=cu_seqlens.device) - starts
    if bd3:
        if (lengths % 2).any():
            raise ValueError(f"mask='bd3' needs every sequence to be [x_t | x_0] of even length, got {lengths.tolist()}")
        positions = positions % (lengths // 2).clamp(min=1).repeat_interleave(lengths)
    return positions, int(lengths.max().item()) if lengths.numel() else 0
