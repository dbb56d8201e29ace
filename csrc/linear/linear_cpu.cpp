// CPU kernel of the `linear` op: the batch-invariant grouped GEMM with one group (csrc/moe).
#include <cstdint>

#include "llada/linear.h"
#include "moe/batch_invariant_gemm_cpu.h"

namespace llada {

Status linear_cpu(const LinearParams& p) {
  if (p.m < 0 || p.m > INT32_MAX || p.n < 0 || p.k < 0 || p.weight_stride < p.k) return Status::kBadArgument;
  const int32_t offsets[2] = {0, static_cast<int32_t>(p.m)};
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
  moe::batch_invariant_gemm(g);
  return Status::kOk;
}

}  // namespace llada
