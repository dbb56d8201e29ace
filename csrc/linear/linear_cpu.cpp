// CPU kernel of the `linear` op: the batch-invariant grouped GEMM with one group (csrc/moe).
#include <cstdint>

#include "linear/one_group.h"
#include "moe/batch_invariant_gemm_cpu.h"

namespace llada {

Status linear_cpu(const LinearParams& p) {
  if (!linear::valid(p)) return Status::kBadArgument;
  const int32_t offsets[2] = {0, static_cast<int32_t>(p.m)};
  moe::batch_invariant_gemm(linear::one_group(p, offsets));
  return Status::kOk;
}

}  // namespace llada
