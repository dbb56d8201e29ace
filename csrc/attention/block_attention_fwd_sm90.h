// Internal interface of the Hopper forward of block attention (block_attention_fwd_sm90.cu), called by the
// CUDA entry point in block_attention_fwd_cuda.cu, which falls back to the FlashAttention-2-style kernel.
#pragma once

#include <cuda_runtime_api.h>

#include "llada/attention.h"

namespace llada {

// Whether the inputs fit the Hopper kernel: bf16/fp16, D in {64, 128}, 16-byte aligned bases and strides
// (TMA), total_q and total_k above 0.
bool block_attention_fwd_sm90_supported(const BlockAttentionParams& p);

// kNotCompiled where the binary loaded for the current device has no sm_90a code for the kernel.
Status block_attention_fwd_sm90(const BlockAttentionParams& p, cudaStream_t stream);

}  // namespace llada
