"""Which part of each parameter a rank holds under tensor and expert parallelism over `world` ranks.

    check_divisible(config, world)               # ValueError naming what `world` does not divide
    plan = shard_plan(config, rank, world)       # our parameter name -> Shard; absent names are replicated
    heads = rank_heads(config, rank, world)      # the rank's query heads and KV heads

Attention by heads: rank r holds query heads [r Hq/N, (r+1) Hq/N) and their KV heads: Hkv/N of them when N
divides Hkv, else (N a multiple of Hkv) the one KV head its query heads share, replicated on N/Hkv ranks.
The dense MLP and the shared expert are column-parallel (gate_proj, up_proj: rows) then row-parallel
(down_proj: columns), the attention output projection row-parallel, the routed experts split by expert
(E/N consecutive experts per rank), the embedding and lm_head by vocabulary rows. Norms, the router and the
expert biases are replicated, and so is the shape of a row-parallel bias: rank 0 holds it, the others zeros,
so that the sum over ranks adds it once.
"""
import dataclasses
from typing import Optional

import torch

from ..model.config import LLaDA2Config


@dataclasses.dataclass(frozen=True)
class Shard:
    """A rank's part of one parameter: the index ranges [start, stop) of the full tensor along `dim`,
    concatenated in this order; or, with `zero`, zeros of the full shape."""
    dim: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    zero: bool = False

    def local_shape(self, shape) -> tuple[int, ...]:
        shape = list(shape)
        if not self.zero:
            shape[self.dim] = sum(stop - start for start, stop in self.ranges)
        return tuple(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor, as a new tensor (a meta tensor for a meta one)."""
        if self.zero:
            return torch.zeros_like(full)
        return torch.cat([full.narrow(self.dim, start, stop - start) for start, stop in self.ranges], self.dim)

    def pieces(self):
        """(start, stop, offset in the local tensor) for each range."""
        offset = 0
        for start, stop in self.ranges:
            yield start, stop, offset
            offset += stop - start

    def locate(self, index: int) -> Optional[int]:
        """Where the full tensor's index `index` along `dim` lies in the local tensor (None: not here)."""
        for start, stop, offset in self.pieces():
            if start <= index < stop:
                return offset + index - start
        return None


@dataclasses.dataclass(frozen=True)
class RankHeads:
    query: tuple[int, int]      # [first, last) query heads
    kv: tuple[int, int]         # [first, last) KV heads

    @property
    def num_heads(self) -> int:
        return self.query[1] - self.query[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv[1] - self.kv[0]


def check_divisible(config: LLaDA2Config, world: int) -> None:
    if world < 1:
        raise ValueError(f"parallel='tp': the number of ranks must be >= 1, got {world}")
    needs = [("num_attention_heads", config.num_attention_heads), ("vocab_size", config.vocab_size)]
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        needs.append(("intermediate_size", config.intermediate_size))
    if config.num_experts:
        needs.append(("num_experts", config.num_experts))
        if config.num_shared_experts:
            needs.append(("moe_intermediate_size x num_shared_experts",
                          config.moe_intermediate_size * config.num_shared_experts))
    for name, value in needs:
        if value % world:
            raise ValueError(f"parallel='tp' over {world} ranks: {name} = {value} is not divisible by {world}")
    kv = config.num_key_value_heads
    if kv % world and world % kv:
        raise ValueError(f"parallel='tp' over {world} ranks: num_key_value_heads = {kv} must be a multiple of "
                         f"{world} (KV heads split) or divide it (KV heads replicated)")


def _even(size: int, rank: int, world: int) -> tuple[int, int]:
    part = size // world
    return rank * part, (rank + 1) * part


def rank_heads(config: LLaDA2Config, rank: int, world: int) -> RankHeads:
    query = _even(config.num_attention_heads, rank, world)
    kv_heads = config.num_key_value_heads
    if kv_heads % world == 0:
        kv = _even(kv_heads, rank, world)
    else:
        head = rank // (world // kv_heads)
        kv = (head, head + 1)
    return RankHeads(query, kv)


def shard_plan(config: LLaDA2Config, rank: int, world: int) -> dict[str, Shard]:
    """The Shard of every parameter that is not replicated, by our parameter name (LLaDA2Model's)."""
    check_divisible(config, world)
    D, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    heads = rank_heads(config, rank, world)
    q_rows = (heads.query[0] * D, heads.query[1] * D)
    qkv = Shard(0, (q_rows, ((Hq + heads.kv[0]) * D, (Hq + heads.kv[1]) * D),
                    ((Hq + Hkv + heads.kv[0]) * D, (Hq + Hkv + heads.kv[1]) * D)))

    def column(size):
        return Shard(0, (_even(size, rank, world),))

    def row(size):
        return Shard(1, (_even(size, rank, world),))

    vocab = column(config.vocab_size)
    plan = {"model.word_embeddings.weight": vocab, "lm_head.weight": vocab}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        plan[f"{p}.attention.query_key_value.weight"] = qkv
        if config.use_qkv_bias:
            plan[f"{p}.attention.query_key_value.bias"] = qkv
        plan[f"{p}.attention.dense.weight"] = Shard(1, (q_rows,))
        if config.use_bias and rank > 0:
            plan[f"{p}.attention.dense.bias"] = Shard(zero=True)
        mlps = []
        if config.is_moe_layer(layer):
            experts = column(config.num_experts)
            plan[f"{p}.mlp.w13"] = plan[f"{p}.mlp.w2"] = experts
            if config.num_shared_experts:
                mlps.append((f"{p}.mlp.shared_experts", config.moe_intermediate_size * config.num_shared_experts))
        else:
            mlps.append((f"{p}.mlp", config.intermediate_size))
        for prefix, size in mlps:
            plan[f"{prefix}.gate_proj.weight"] = plan[f"{prefix}.up_proj.weight"] = column(size)
            plan[f"{prefix}.down_proj.weight"] = row(size)
    return plan
