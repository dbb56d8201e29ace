// What the block-attention kernels make of non-finite scores, written once for the CPU and CUDA kernels
// (forward, decode form, the merge of split-KV runs) and tested on the CPU (tests/cpp/test_softmax_rule.cpp).
//
// A row's online softmax keeps the running max m of its scores and the running sum l of exp(s - m) over the
// keys the mask keeps; a masked score is replaced by -inf (never added to), so nothing of a masked key reaches
// the row. The row then ends as the dense reference (softmax and logsumexp of the masked scores) ends:
//   a score is NaN               lse NaN,   out NaN
//   else a score is +inf         lse +inf,  out NaN (inf / inf)
//   else every score is -inf     lse -inf,  out 0    (the row saw no key: a score of -inf weighs 0)
//   else                         lse = m + log l,  out = O / l
// For that m is a NaN-propagating max (fmaxf and std::max drop a NaN), and the end reads m, not l (which is
// NaN in both of the first two cases). The out of a row that saw no key is written as 0, not O * 0: O may
// hold 0 * NaN there, from a NaN or inf value of a key the row does not see but shares a tile with.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace llada {

// max(a, b), NaN when either is NaN.
LLADA_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || a > b) ? a : b;
#endif
}

// The log-sum-exp of a row from its running max m and log(l), in the units of m (log2 for exp2 kernels).
LLADA_HD float row_lse(float m, float log_l) {
  return (m == INFINITY || m == -INFINITY) ? m : m + log_l;
}

// The factor of a row's unnormalised output: 1 / l; 0 for a row that saw no key; NaN after a NaN or +inf score.
LLADA_HD float row_out_scale(float m, float l) {
  if (m == -INFINITY) return 0.0f;
  return (m != m || m == INFINITY) ? NAN : 1.0f / l;
}

// A row's output element from its unnormalised accumulator o and its row_out_scale: exactly 0 for a row that
// saw no key (the only row whose scale is 0: l >= 1 otherwise).
LLADA_HD float row_out(float o, float scale) { return scale == 0.0f ? 0.0f : o * scale; }

}  // namespace llada
