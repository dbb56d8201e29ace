// Mixture of experts (docs/ARCHITECTURE.md, Mixture of experts): the torch-free interface of the `moe_*` op family.
//
//   route      router logits -> top-k experts and their weights per token (the LLaDA2 gate)
//   permute    token rows copied into expert order, with per-expert offsets and the inverse index
//   grouped    C[rows of group g] = A[rows of group g] @ B[g]^T for every group g, in one call
//   wgrad      dB[g] = dC[rows of g]^T @ A[rows of g]: the weight gradient, a grouped GEMM over a ragged K
//   unpermute  out[t] = sum_s w[t, s] * Y[inverse[t * k + s]], and its backward
//
// Shapes: T tokens, E experts (= groups), k experts per token, H hidden, M = T * k permuted rows,
// K and N the inner and output sizes of a grouped GEMM. Index tensors are int32, weights fp32.
// Tie-breaking of the routing: among equal scores the lower group or expert index is chosen first;
// the k chosen experts of a token are listed by descending biased score. The permutation is stable:
// within an expert, rows follow the flattened (token, slot) index t * k + s.
#pragma once

#include <cstdint>

#include "llada/dtype.h"
#include "llada/status.h"

#ifdef LLADA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace llada {

struct MoeRouteParams {
  const void* logits = nullptr;         // [T, E] contiguous, of logits_dtype (read as fp32)
  DType logits_dtype = DType::kFloat32;
  const float* expert_bias = nullptr;   // [E], added to the scores for selection only; null: zeros
  int32_t* topk_ids = nullptr;          // [T, k] out
  float* topk_weights = nullptr;        // [T, k] out

  int64_t tokens = 0;                   // T
  int64_t experts = 0;                  // E
  int64_t top_k = 0;                    // k, 1 <= k <= topk_group * E / n_group
  int64_t n_group = 1;                  // divides E
  int64_t topk_group = 1;               // 1 <= topk_group <= n_group
  float routed_scaling_factor = 1.0f;
  bool norm_topk_prob = true;
};

struct MoePermuteParams {
  const void* x = nullptr;              // [T, H] contiguous
  DType dtype = DType::kFloat32;
  const int32_t* topk_ids = nullptr;    // [T, k], values in [0, E)
  void* x_sorted = nullptr;             // [M, H] out: row inverse[t * k + s] is x[t]
  int32_t* offsets = nullptr;           // [E + 1] out: expert e owns rows offsets[e]:offsets[e + 1]
  int32_t* inverse = nullptr;           // [M] out

  int64_t tokens = 0;                   // T
  int64_t hidden = 0;                   // H
  int64_t top_k = 0;                    // k
  int64_t experts = 0;                  // E
};

struct MoeUnpermuteParams {
  const void* y = nullptr;              // [M, H] contiguous
  DType dtype = DType::kFloat32;
  const int32_t* inverse = nullptr;     // [T * k], values in [0, M)
  const float* topk_weights = nullptr;  // [T, k]
  void* out = nullptr;                  // [T, H] out, dtype of y, accumulated in fp32

  int64_t tokens = 0;                   // T
  int64_t hidden = 0;                   // H
  int64_t top_k = 0;                    // k
  int64_t rows = 0;                     // M
};

struct MoeUnpermuteBackwardParams {
  const void* grad_out = nullptr;       // [T, H] contiguous, dtype of y
  const void* y = nullptr;              // [M, H] contiguous
  DType dtype = DType::kFloat32;
  const int32_t* inverse = nullptr;     // [T * k], a permutation of [0, M)
  const float* topk_weights = nullptr;  // [T, k]
  void* grad_y = nullptr;               // [M, H] out: w[t, s] * grad_out[t] at row inverse[t * k + s]
  float* grad_weights = nullptr;        // [T, k] out: <grad_out[t], y[inverse[t * k + s]]>

  int64_t tokens = 0;                   // T
  int64_t hidden = 0;                   // H
  int64_t top_k = 0;                    // k
  int64_t rows = 0;                     // M = T * k; inverse must be a permutation of [0, M)
};

// The CPU instruction sets the batch-invariant GEMM may use: the best the machine has (AMX for bf16, else
// AVX-512, else plain C++), or a lower one (tests run each path the machine can).
enum class CpuIsa : int { kBest = 0, kAvx512 = 1, kPortable = 2 };

// The cap set by the environment: LLADA_CPU_ISA=avx512|portable, else kBest.
CpuIsa cpu_isa_from_env();

// The path the batch-invariant CPU GEMM takes for `dtype` under the cap `isa` on this machine: "amx" (bf16
// with K a multiple of 32 only; other K take "avx512"), "avx512" or "portable".
const char* batch_invariant_gemm_cpu_path(DType dtype, CpuIsa isa);

struct GroupedGemmParams {
  const void* a = nullptr;              // [M, K] contiguous
  const void* b = nullptr;              // [E, N, K] with the strides below (elements)
  const int32_t* offsets = nullptr;     // [E + 1], 0 = offsets[0] <= ... <= offsets[E] = M
                                        // (CUDA: null means one group of all M rows, E = 1)
  void* c = nullptr;                    // [M, N] out, contiguous
  DType dtype = DType::kFloat32;        // of a, b and c; accumulation is fp32

  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t groups = 0;                   // E
  int64_t b_stride_group = 0;
  int64_t b_stride_n = 0;
  int64_t b_stride_k = 1;
  // Every row's result independent of the rows around it and of how many there are: one kernel and one
  // reduction order per (dtype, K, B layout, machine). The CPU kernels are so always; false lets sm_90
  // pick its tile shape by rows per group.
  bool batch_invariant = true;
  CpuIsa cpu_isa = CpuIsa::kBest;
};

struct GroupedGemmWgradParams {
  const void* grad_c = nullptr;         // [M, N] contiguous
  const void* a = nullptr;              // [M, K] contiguous
  const int32_t* offsets = nullptr;     // [E + 1], as in GroupedGemmParams
  void* grad_b = nullptr;               // [E, N, K] out, contiguous; zero for a group without rows
  DType dtype = DType::kFloat32;

  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t groups = 0;                   // E
};

// C++ CPU kernels (OpenMP). kBadArgument: sizes outside the documented domain, an index out of
// range or offsets that are not monotonic from 0 to M (outputs then unspecified). A NaN router logit
// ranks its expert first and makes its token's weights NaN (moe/route_rule.h). Supported dtypes: fp32 and
// bf16 (route also reads fp16 logits; the grouped GEMMs take fp16).
Status moe_route_cpu(const MoeRouteParams& p);
Status moe_permute_cpu(const MoePermuteParams& p);
Status moe_unpermute_cpu(const MoeUnpermuteParams& p);
Status moe_unpermute_backward_cpu(const MoeUnpermuteBackwardParams& p);
Status moe_grouped_gemm_cpu(const GroupedGemmParams& p);
Status moe_grouped_gemm_wgrad_cpu(const GroupedGemmWgradParams& p);

#ifdef LLADA_WITH_CUDA
// CUDA kernels, asynchronous on `stream`, no host synchronisation (scratch memory is stream-ordered,
// cudaMallocAsync). Route/permute/unpermute take fp32, bf16 and fp16. Ids outside [0, E) cannot be
// reported without a sync: they are counted nowhere, get inverse = -1 and contribute nothing to
// unpermute. Routing follows the CPU kernel's rule, NaN included.
// The grouped GEMMs take bf16 with K and N multiples of 8 (16-byte rows), fp32 accumulation:
// CUTLASS 3.x pointer-array TMA kernels on sm_90, CUTLASS 2.x GemmGrouped on sm_80..sm_89; and fp32
// of any size (CUTLASS 2.x SIMT kernels, sm_80 and sm_90).
// Offsets are read on the device only; kBadArgument for other dtypes, alignments or architectures.
Status moe_route_cuda(const MoeRouteParams& p, cudaStream_t stream);
Status moe_permute_cuda(const MoePermuteParams& p, cudaStream_t stream);
Status moe_unpermute_cuda(const MoeUnpermuteParams& p, cudaStream_t stream);
Status moe_unpermute_backward_cuda(const MoeUnpermuteBackwardParams& p, cudaStream_t stream);
Status moe_grouped_gemm_cuda(const GroupedGemmParams& p, cudaStream_t stream);
Status moe_grouped_gemm_wgrad_cuda(const GroupedGemmWgradParams& p, cudaStream_t stream);
#endif

}  // namespace llada
