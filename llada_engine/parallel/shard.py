"""Tensor and expert parallelism applied to a LLaDA2Model in place by one function.

    model = parallelize(model, group=None)       # each rank keeps its part (plan.py) of every parameter
    model.parallel                               # TensorParallel: group, rank, world, the full config
    parameter_bytes(model)                       # what this rank holds, and how much of it is replicated

The model keeps its methods and its decoding interface (forward, prefill, forward_paged): every rank runs
them on the same inputs, holds the same hidden states and gets the same full logits, so decoding commits the
same tokens everywhere. Per decoder layer there is one all-reduce after attention and one after the MLP (the
routed experts and the shared expert of a MoE layer together); the embedding sums its vocabulary slices, and
lm_head's slices are gathered into the full logits.

`model.config` becomes the config of what the rank computes: the checkpoint's, with the rank's own
num_attention_heads and num_key_value_heads, so that the page pools of an Engine on it hold the rank's KV
heads only; `model.parallel.config` is the checkpoint's. A meta model is sharded as meta (checkpoint loading
fills it); a model with weights keeps copies of its slices. As FSDP2's fully_shard does, the model's class
becomes a subclass that keeps the expert-parallel ops when the backend changes and refuses to save a partial
checkpoint.
"""
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..model.backend import op_set
from ..model.config import LLaDA2Config
from ..model.model import LLaDA2Model
from ..model.modules import Attention
from .collectives import least, require_group
from .layers import VocabParallelEmbedding, expert_parallel, gather_logits, reduce_output
from .plan import rank_heads, shard_plan


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    group: dist.ProcessGroup
    rank: int
    world: int
    config: LLaDA2Config                 # the checkpoint's
    plan: dict                           # our parameter name -> Shard (plan.py); absent: replicated

    @property
    def first_expert(self) -> int:
        return self.rank * (self.config.num_experts or 0) // self.world

    def least(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value`: for what the ranks must decide alike from what differs
        between them (a cache size from each GPU's free memory)."""
        return least(value, self.group, device)


class TensorParallelModel:
    """Mixed in before the model's own class by `parallelize`."""

    parallel: TensorParallel

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        ops = op_set(value)
        moe_experts = expert_parallel(ops.moe_experts, self.parallel.first_expert, checks_ids=value == "kernels")
        self._ops = dataclasses.replace(ops, moe_experts=moe_experts)
        self._backend = value

    def save_pretrained(self, *args, **kwargs) -> None:
        raise RuntimeError(f"this model is tensor-parallel: rank {self.parallel.rank} holds 1/{self.parallel.world}"
                           " of the weights; save a checkpoint from a model loaded in one process")


_CLASSES: dict[type, type] = {}


def _parallel_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TensorParallel{cls.__name__}", (TensorParallelModel, cls), {})
    return _CLASSES[cls]


def parallelize(model: LLaDA2Model, group: Optional[dist.ProcessGroup] = None) -> LLaDA2Model:
    """Shards `model` in place over the ranks of `group` (default: the default process group); see the module doc."""
    group = require_group(group)
    if isinstance(model, TensorParallelModel):
        raise ValueError("the model is tensor-parallel already")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = model.config
    plan = shard_plan(config, rank, world)
    with torch.no_grad():
        for name, shard in plan.items():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(shard.take(old.detach()), requires_grad=old.requires_grad)
    heads = rank_heads(config, rank, world)
    for module in model.modules():
        if isinstance(module, Attention):
            module.num_heads, module.num_kv_heads = heads.num_heads, heads.num_kv_heads
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    for layer in model.model.layers:
        layer.attention.register_forward_hook(reduce_output(group))
        layer.mlp.register_forward_hook(reduce_output(group))
    vocab_start = plan["lm_head.weight"].ranges[0][0]
    model.model.word_embeddings = VocabParallelEmbedding(model.model.word_embeddings.weight, vocab_start, group)
    model.lm_head.register_forward_hook(gather_logits(group))

    model.__class__ = _parallel_class(type(model))
    model.parallel = TensorParallel(group, rank, world, config, plan)
    model.config = dataclasses.replace(config, num_attention_heads=heads.num_heads,
                                       num_key_value_heads=heads.num_kv_heads, extra=dict(config.extra))
    model.backend = model.backend
    return model


def parameter_bytes(model: LLaDA2Model) -> dict[str, int]:
    """Bytes of this rank's parameters and buffers, and of those that every rank holds whole (replicated)."""
    plan = model.parallel.plan if isinstance(model, TensorParallelModel) else {}
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    replicated = sum(size for name, size in sizes.items() if name not in plan or plan[name].zero)
    return {"bytes": sum(sizes.values()), "replicated_bytes": replicated}
