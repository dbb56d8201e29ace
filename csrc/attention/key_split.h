// Split-KV for the CUDA decode form (flash-decoding): the keys of a query tile are cut at fixed key positions
// into runs of kKeysPerSplit keys (whole key tiles), one thread block each, whose partial results (the output
// normalised within the run and its log-sum-exp) are merged afterwards. Host/device, tested on the CPU
// (tests/cpp/test_key_split.cpp).
//
// The cuts are a fixed size, never a count chosen to fill the GPU from batch x heads: where the keys are cut
// decides the rounding of the merge, so a count that followed the batch would give a sequence other bits in
// another batch. With fixed cuts a sequence's runs are the same in any batch; the runs past its own keys are
// empty and merge as exact zeros, and a sequence with a single run gets exactly the unsplit result (its merge
// weight is exp(0) = 1), so every sequence gets the same output alone or in any batch.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/block_mask.h"
#include "attention/softmax_rule.h"
#include "common/host_device.h"

namespace llada {

// Keys per run: 8 tiles of 64. About as many thread blocks as a batch-1 decode needs to fill an H100 at a
// few thousand keys, and few enough partial results that their merge costs a few percent of the key reads.
constexpr int64_t kKeysPerSplit = 512;

// Runs needed for key ranges within [0, max_keys).
LLADA_HD int key_splits(int64_t max_keys) {
  return static_cast<int>(max_i64(1, (max_keys + kKeysPerSplit - 1) / kKeysPerSplit));
}

// Run `split` of the key range `keys`: its part within [split, split + 1) * kKeysPerSplit; possibly empty.
LLADA_HD RowRange split_keys(RowRange keys, int split) {
  const int64_t begin = max_i64(keys.begin, split * kKeysPerSplit);
  const int64_t end = min_i64(keys.end, (split + 1) * kKeysPerSplit);
  return begin < end ? RowRange{begin, end} : RowRange{begin, begin};
}

// The log-sum-exp of `n` partial log-sum-exps (stride apart); -inf when every run saw nothing, NaN or +inf
// when a run's is (attention/softmax_rule.h: then merge_weight makes the merged output NaN).
LLADA_HD float merged_lse(const float* lse, int n, int64_t stride) {
  float top = -INFINITY;
  for (int s = 0; s < n; ++s) top = max_nan(top, lse[s * stride]);
  if (top == -INFINITY || top == INFINITY) return top;
  float sum = 0.0f;
  for (int s = 0; s < n; ++s) sum += expf(lse[s * stride] - top);
  return top + logf(sum);
}

// The weight of a run's normalised output in the merged output: exp(lse_s - lse), 0 for an empty run.
LLADA_HD float merge_weight(float lse_s, float lse) {
  return lse_s == -INFINITY ? 0.0f : expf(lse_s - lse);
}

}  // namespace llada
