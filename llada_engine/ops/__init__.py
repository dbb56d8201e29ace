"""The ops of llada_engine, one module per family. Each family has its public wrapper (calling the
compiled `torch.ops.llada` kernel), its fake (meta) implementation for torch.compile, and its pure-PyTorch
reference `<op>_ref`, which is the oracle of the tests and the baseline of the benchmarks."""
from .._extension import kernels_available
from .block_attention import (block_attention, block_attention_decode, block_attention_decode_ref,
                              block_attention_ref, block_mask_dense)
from .commit_tokens import CommitResult, commit_tokens, commit_tokens_, commit_tokens_ref
from .checks import register_no_kernel_errors
from .linear import linear, linear_ref
from .moe import (moe_experts, moe_experts_ref, moe_grouped_gemm, moe_grouped_gemm_ref, moe_permute,
                  moe_permute_ref, moe_route, moe_route_ref, moe_unpermute, moe_unpermute_ref)

__all__ = ["CommitResult", "block_attention", "block_attention_decode", "block_attention_decode_ref",
           "block_attention_ref", "block_mask_dense", "commit_tokens", "commit_tokens_", "commit_tokens_ref", "linear",
           "linear_ref", "moe_experts", "moe_experts_ref", "moe_grouped_gemm", "moe_grouped_gemm_ref", "moe_permute",
           "moe_permute_ref", "moe_route", "moe_route_ref", "moe_unpermute", "moe_unpermute_ref"]

if kernels_available():
    register_no_kernel_errors()
