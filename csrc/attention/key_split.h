// Split-KV for the CUDA decode form (flash-decoding): the keys of a query tile are cut into `splits` runs of
// whole key tiles, one thread block each, whose partial results (the output normalised within the run and
// its log-sum-exp) are merged afterwards. Host/device, tested on the CPU (tests/cpp/test_key_split.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/block_mask.h"
#include "attention/softmax_rule.h"
#include "common/host_device.h"

namespace llada {

// How many runs: enough thread blocks to fill the GPU twice over (`blocks` = blocks without a split),
// at most one per key tile, at most kMaxKeySplits.
constexpr int kMaxKeySplits = 32;

LLADA_HD int key_splits(int64_t blocks, int64_t max_keys, int64_t tile, int sm_count) {
  if (blocks <= 0 || max_keys <= 0) return 1;
  const int64_t wanted = (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  const int64_t tiles = (max_keys + tile - 1) / tile;
  return static_cast<int>(max_i64(1, min_i64(min_i64(wanted, tiles), kMaxKeySplits)));
}

// Run `split` of `splits` over the key range `keys`: tile-aligned (tiles of `tile` keys counted from 0),
// consecutive, disjoint, covering `keys`; possibly empty.
LLADA_HD RowRange split_keys(RowRange keys, int split, int splits, int64_t tile) {
  if (keys.begin >= keys.end) return RowRange{keys.begin, keys.begin};
  const int64_t first = keys.begin / tile, count = (keys.end + tile - 1) / tile - first;
  const int64_t per = (count + splits - 1) / splits;
  const int64_t begin = max_i64(keys.begin, (first + split * per) * tile);
  return RowRange{min_i64(begin, keys.end), min_i64(keys.end, (first + (split + 1) * per) * tile)};
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
