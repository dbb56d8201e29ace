// CUDA kernel of the `linear` op: the MoE grouped GEMM's CUTLASS kernels with one group of all M rows
// (offsets null, so nothing is copied to the device), in batch-invariant mode: one kernel, no split-K.
#include <cstdint>

#include "llada/linear.h"
#include "llada/moe.h"

namespace llada {

Status linear_cuda(const LinearParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.m > INT32_MAX || p.n < 0 || p.k < 0 || p.weight_stride < p.k) return Status::kBadArgument;
  GroupedGemmParams g;
  g.a = p.x;
  g.b = p.weight;
  g.offsets = nullptr;
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
  return moe_grouped_gemm_cuda(g, stream);
}

}  // namespace llada
