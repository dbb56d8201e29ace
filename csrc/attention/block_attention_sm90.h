// Internal interface of the Hopper kernels of block attention (block_attention_fwd_sm90.cu,
// block_attention_bwd_sm90.cu), called by the CUDA entry points in block_attention_fwd_cuda.cu and
// block_attention_bwd_cuda.cu, which fall back to the FlashAttention-2-style kernels.
#pragma once

#include <cuda_runtime_api.h>

#include "llada/attention.h"

namespace llada {

// Whether the inputs fit the Hopper kernels: bf16/fp16, D in {64, 128}, 16-byte aligned bases and strides
// (TMA), total_q and total_k above 0; for the backward also a 16-byte aligned dout.
bool block_attention_fwd_sm90_supported(const BlockAttentionParams& p);
bool block_attention_bwd_sm90_supported(const BlockAttentionBwdParams& p);

// kNotCompiled where the binary loaded for the current device has no sm_90a code for the kernel.
Status block_attention_fwd_sm90(const BlockAttentionParams& p, cudaStream_t stream);
// The main kernel of the backward only: delta (row deltas) and a zeroed dq_accum come from the caller, which
// converts dq_accum afterwards (block_attention_bwd_cuda.cu).
Status block_attention_bwd_sm90(const BlockAttentionBwdParams& p, const float* delta, float* dq_accum,
                                cudaStream_t stream);

}  // namespace llada
