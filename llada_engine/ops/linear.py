"""The batch-invariant linear layer: out = x @ weight^T with every row's result independent of the other
rows in the call and of how many there are.

    linear(x, weight, bias=None) -> [..., N]     # x [..., K], weight [N, K] (nn.Linear's layout), bias [N]
    linear_ref(x, weight, bias=None)             # the pure-PyTorch reference: fp32 products, rounded once

Why: F.linear's CPU and GPU libraries pick their kernel, blocking and split of K by the shape, so the same
token's projection changes in its last bits with the number of tokens beside it, and in block diffusion a
last-bit change can flip which tokens a step commits. This op runs one kernel and one reduction order that
depend on K, N, the dtype and the machine only (the one-group case of moe_grouped_gemm in its
batch-invariant mode: AMX, AVX-512 or plain C++ tiles on the CPU, one CUTLASS kernel without split-K on
CUDA). dtypes: fp32, bf16, fp16 on the CPU; bf16 (N, K multiples of 8) and fp32 on CUDA. The bias is
added after the product, in the output dtype (elementwise, so per row). The backward runs ordinary
matmuls: gradients are not batch-invariant.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .._extension import kernels_available, require_kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], each row alone or in any batch the same."""
    require_kernels("linear")
    out = torch.ops.llada.linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear in fp32, rounded once to x's dtype, then the bias added in that dtype."""
    out = F.linear(x.float(), weight.float()).to(x.dtype)
    return out if bias is None else out + bias


if kernels_available():
    @torch.library.register_fake("llada::linear")
    def _linear_fake(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0]))

    def _linear_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _linear_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w

    torch.library.register_autograd("llada::linear", _linear_backward, setup_context=_linear_setup)
