"""The op set a model runs on: the compiled kernels (`torch.ops.llada` through llada_engine.ops) or the
pure-PyTorch references. The model never calls an op except through one of these, so the two agree by
construction of the tests that hold each op to its reference.

The kernels run in one of two numerics. batch_invariant=True (the default): the linear layers run the `linear`
op and the routed experts the grouped GEMM's batch-invariant mode, so every token's result is the same alone
or in any batch (the other ops are per row by construction). batch_invariant=False: F.linear (the BLAS picks its
kernel by shape) and the grouped GEMM's fastest path by rows per expert. The references run F.linear and the
official loop over experts either way (the official numerics, not batch-invariant).
"""
import dataclasses
import functools
from typing import Callable

import torch.nn.functional as F

from .. import ops

BACKENDS = ("kernels", "reference")


@dataclasses.dataclass(frozen=True)
class OpSet:
    block_attention: Callable
    block_attention_decode: Callable
    moe_route: Callable
    moe_experts: Callable
    linear: Callable          # (x, weight, bias=None): every linear layer's product


def op_set(backend: str, batch_invariant: bool = True) -> OpSet:
    if backend == "kernels":
        return OpSet(ops.block_attention, ops.block_attention_decode, ops.moe_route,
                     functools.partial(ops.moe_experts, batch_invariant=batch_invariant),
                     ops.linear if batch_invariant else F.linear)
    if backend == "reference":
        return OpSet(ops.block_attention_ref, ops.block_attention_decode_ref, ops.moe_route_ref, ops.moe_experts_ref,
                     F.linear)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
