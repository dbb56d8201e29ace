// The `linear` op as the MoE grouped GEMM's one-group case: out [M, N] = x [M, K] @ weight [N, K]^T.
#pragma once

#include <cstdint>

#include "llada/linear.h"
#include "llada/moe.h"

namespace llada::linear {

inline bool valid(const LinearParams& p) {
  return p.m >= 0 && p.m <= INT32_MAX && p.n >= 0 && p.k >= 0 && p.weight_stride >= p.k;
}

// `offsets`: {0, M} on the host for the CPU kernel, or nullptr (one group of all M rows) for CUDA.
inline GroupedGemmParams one_group(const LinearParams& p, const int32_t* offsets) {
  GroupedGemmParams g;
  g.a = p.x;
  g.b = p.weight;
  g.offsets = offsets;
  g.c = p.out;
  g.dtype = p.dtype;
  g.m = p.m;
  g.n = p.n;
  g.k = p.k;
  g.groups = 1;
  g.b_stride_group = p.n * p.weight_stride;
  g.b_stride_n = p.weight_stride;
  g.b_stride_k = 1;
  g.batch_invariant = true;
  g.cpu_isa = p.cpu_isa;
  return g;
}

}  // namespace llada::linear
