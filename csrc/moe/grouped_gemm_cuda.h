// Internal interface between the CUDA grouped-GEMM entry points (grouped_gemm_cuda.cu) and the
// per-architecture CUTLASS instantiations (grouped_gemm_sm90.cu, grouped_gemm_sm80.cu).
//
// Every kind is one grouped GEMM D_g = A_g B_g whose per-group sizes, pointers and strides a small
// device kernel derives from the offsets, so the host never reads them:
//   kForward        D [M, N] rows of g = A [M, K] rows of g @ B[g]^T, B [E, N, K] K-contiguous
//   kForwardNMajor  the same with B[g] N-contiguous (B^T of a K-contiguous [E, K, N]: the dgrad)
//   kWgrad          D[g] [N, K] = dC [M, N] rows of g ^T @ A [M, K] rows of g (ragged reduction)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "llada/status.h"

namespace llada {
namespace moe_cuda {

enum class GemmKind { kForward, kForwardNMajor, kWgrad };

struct GroupedGemmProblem {
  GemmKind kind = GemmKind::kForward;
  const void* a = nullptr;          // kForward*: A [M, K]; kWgrad: dC [M, N]
  const void* b = nullptr;          // kForward*: B [E, N, K] strided; kWgrad: A [M, K]
  const int32_t* offsets = nullptr; // [E + 1] on the device; null: one group of all M rows (groups == 1)
  void* d = nullptr;                // kForward*: [M, N]; kWgrad: [E, N, K]
  int64_t m = 0, n = 0, k = 0, groups = 0;
  int64_t b_stride_group = 0;       // kForward*: elements between B[g] and B[g + 1]
  int64_t b_ld = 0;                 // kForward*: stride of B[g]'s non-contiguous dimension
  bool fp32 = false;                // fp32 operands (else bf16)
  bool batch_invariant = true;      // forward: one kernel whatever the rows per group
  int device = 0;
  int sm_count = 0;
};

// fp32 accumulation. sm90: bf16 only; sm80: bf16 (tensor cores) or fp32 (SIMT), run on sm_80 and later.
Status grouped_gemm_sm90(const GroupedGemmProblem& p, cudaStream_t stream);
Status grouped_gemm_sm80(const GroupedGemmProblem& p, cudaStream_t stream);

}  // namespace moe_cuda
}  // namespace llada
