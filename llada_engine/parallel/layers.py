"""The pieces a tensor-parallel model computes with beyond its sliced weights.

    VocabParallelEmbedding          the rank's vocabulary rows; other ids give zeros; summed over ranks
    reduce_output(group)            forward hook: a row-parallel module's partial output summed over ranks
    gather_logits(group)            forward hook: lm_head's vocabulary slice -> the full logits on every rank
    expert_parallel(moe_experts, first, checks_ids)   moe_experts over the rank's experts only

T = tokens, H = hidden, V = vocabulary, E = experts (El of them on this rank), k = experts per token.
"""
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import ops
from .collectives import all_reduce_, gather_last_dim


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [start, start + weight.shape[0]) of the vocabulary; the sum over ranks is the lookup."""

    def __init__(self, weight: torch.Tensor, start: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)   # [V / N, H]
        self.start = start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)              # [T, H]
        return all_reduce_(h.masked_fill_(outside.unsqueeze(-1), 0), self.group)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.start + self.weight.shape[0]}), hidden {self.weight.shape[1]}"


def reduce_output(group: dist.ProcessGroup):
    def hook(module, args, output):
        return all_reduce_(output, group)
    return hook


def gather_logits(group: dist.ProcessGroup):
    def hook(module, args, output):
        return gather_last_dim(output, group)                                    # [..., V]
    return hook


def expert_parallel(moe_experts, first: int, checks_ids: bool):
    """moe_experts(x, topk_ids, topk_weights, w13, w2) for a rank holding experts [first, first + El) as
    w13 [El, 2I, H], w2 [El, H, I]: the routed output of its experts only [T, H] (a slot of another rank's
    expert contributes nothing). `checks_ids`: moe_experts is the CPU kernel, which refuses ids outside
    [0, El) (CUDA and the reference let them contribute nothing)."""
    return functools.partial(_local_experts, moe_experts, first, checks_ids)


def _local_experts(moe_experts, first, checks_ids, x, topk_ids, topk_weights, w13, w2):
    count = w13.shape[0]
    local = topk_ids - first                                                     # [T, k] int32
    mine = (local >= 0) & (local < count)
    ids = torch.where(mine, local, count)                                        # count: none of this rank's
    if not checks_ids or x.is_cuda:
        return moe_experts(x, ids, topk_weights, w13, w2)
    # The other ranks' slots form one extra group past the local experts, never multiplied: its rows of y are
    # zeros and their weights zero. The CPU holds the offsets, so reading one costs no device sync.
    x_sorted, offsets, inverse = ops.moe_permute(x, ids, count + 1)              # [T*k, H], [El+2], [T*k]
    rows = int(offsets[count])
    h = ops.moe_grouped_gemm(x_sorted[:rows], w13, offsets[:count + 1])          # [rows, 2I]
    intermediate = w13.shape[1] // 2
    y = ops.moe_grouped_gemm(F.silu(h[:, :intermediate]) * h[:, intermediate:], w2, offsets[:count + 1])
    y = torch.cat([y, y.new_zeros(x_sorted.shape[0] - rows, y.shape[1])])       # [T*k, H]
    return ops.moe_unpermute(y, inverse, topk_weights.masked_fill(~mine, 0))
