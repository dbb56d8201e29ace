"""The op set a model runs on: the compiled kernels (`torch.ops.llada` through llada_engine.ops) or the
pure-PyTorch references. The model never calls an op except through one of these, so the two agree by
construction of the tests that hold each op to its reference."""
import dataclasses
from typing import Callable

from .. import ops

BACKENDS = ("kernels", "reference")


@dataclasses.dataclass(frozen=True)
class OpSet:
    block_attention: Callable
    block_attention_decode: Callable
    moe_route: Callable
    moe_experts: Callable


def op_set(backend: str) -> OpSet:
    if backend == "kernels":
        return OpSet(ops.block_attention, ops.block_attention_decode, ops.moe_route, ops.moe_experts)
    if backend == "reference":
        return OpSet(ops.block_attention_ref, ops.block_attention_decode_ref, ops.moe_route_ref, ops.moe_experts_ref)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
