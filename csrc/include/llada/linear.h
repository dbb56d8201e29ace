// The batch-invariant linear layer: the torch-free interface of the `linear` op.
//
//   out [M, N] = x [M, K] @ weight [N, K]^T, fp32 accumulation, rounded once to the dtype.
//
// Every row of `out` is computed by one instruction sequence and one reduction order that depend on K, N,
// the dtype and the machine only, never on M or on where the row sits: a token's projection is the same
// alone or in any batch. It is the one-group case of the MoE grouped GEMM (moe.h) in its batch-invariant
// mode: on the CPU the AMX / AVX-512 / plain C++ tiles, on CUDA one CUTLASS kernel without split-K.
#pragma once

#include <cstdint>

#include "llada/dtype.h"
#include "llada/moe.h"
#include "llada/status.h"

#ifdef LLADA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace llada {

struct LinearParams {
  const void* x = nullptr;        // [M, K] contiguous
  const void* weight = nullptr;   // [N, K], K-contiguous, rows weight_stride elements apart
  void* out = nullptr;            // [M, N] out, contiguous
  DType dtype = DType::kFloat32;  // of x, weight and out

  int64_t m = 0;                  // at most INT32_MAX
  int64_t n = 0;
  int64_t k = 0;
  int64_t weight_stride = 0;      // >= K
  CpuIsa cpu_isa = CpuIsa::kBest;
};

// CPU: fp32, bf16, fp16, any sizes. kBadArgument for sizes outside the domain above.
Status linear_cpu(const LinearParams& p);

#ifdef LLADA_WITH_CUDA
// CUDA, asynchronous on `stream`: bf16 with N, K, weight_stride multiples of 8 and 16-byte aligned
// pointers, or fp32 of any size; kBadArgument otherwise.
Status linear_cuda(const LinearParams& p, cudaStream_t stream);
#endif

}  // namespace llada
