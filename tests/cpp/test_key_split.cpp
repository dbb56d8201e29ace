// Split-KV of the CUDA decode form (csrc/attention/key_split.h) on the CPU: the split count, the runs of key
// tiles (disjoint, tile-aligned, covering the keys), and the merge of partial outputs against one softmax
// over all keys, with empty runs among them.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "attention/key_split.h"
#include "check.h"

using llada::RowRange;

namespace {

void test_key_splits() {
  CHECK(llada::key_splits(16, 4096 + 32, 64, 132) == 17);   // batch 1, 16 heads: 17 runs of about 4 tiles
  CHECK(llada::key_splits(264, 4096, 64, 132) == 1);         // the grid already fills the GPU twice
  CHECK(llada::key_splits(1, 100, 64, 132) == 2);            // no more runs than key tiles
  CHECK(llada::key_splits(1, 1 << 20, 64, 132) == llada::kMaxKeySplits);
  CHECK(llada::key_splits(0, 100, 64, 132) == 1);
  CHECK(llada::key_splits(4, 0, 64, 132) == 1);
}

void test_split_keys() {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t tile = trial % 3 == 0 ? 64 : 1 + rng() % 70;
    const int64_t begin = rng() % 300, end = begin + rng() % 900;
    const int splits = 1 + static_cast<int>(rng() % 40);
    int64_t at = begin, longest = 0;
    for (int s = 0; s < splits; ++s) {
      const RowRange r = llada::split_keys(RowRange{begin, end}, s, splits, tile);
      if (r.begin >= r.end) continue;
      CHECK(r.begin == at);                                     // consecutive and disjoint
      CHECK(r.begin == begin || r.begin % tile == 0);           // whole tiles inside
      CHECK(r.end == end || r.end % tile == 0);
      longest = std::max(longest, (r.end - 1) / tile - r.begin / tile + 1);
      at = r.end;
    }
    CHECK(at == (begin < end ? end : begin));                   // covering
    const int64_t tiles = begin < end ? (end + tile - 1) / tile - begin / tile : 0;
    CHECK(longest <= (tiles + splits - 1) / splits);
  }
}

void test_merge() {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 200), splits = 1 + static_cast<int>(rng() % 12);
    const int64_t tile = 1 + rng() % 20;
    std::vector<float> score(n), value(n);
    for (int j = 0; j < n; ++j) {
      score[j] = normal(rng);
      value[j] = normal(rng);
    }
    double top = -INFINITY, sum = 0.0, out = 0.0;
    for (int j = 0; j < n; ++j) top = std::max(top, static_cast<double>(score[j]));
    for (int j = 0; j < n; ++j) {
      sum += std::exp(score[j] - top);
      out += std::exp(score[j] - top) * value[j];
    }
    const double want_lse = top + std::log(sum), want_out = out / sum;
    std::vector<float> lse(splits), part(splits);
    for (int s = 0; s < splits; ++s) {
      const RowRange r = llada::split_keys(RowRange{0, n}, s, splits, tile);
      double m = -INFINITY, l = 0.0, o = 0.0;
      for (int64_t j = r.begin; j < r.end; ++j) m = std::max(m, static_cast<double>(score[j]));
      for (int64_t j = r.begin; j < r.end; ++j) {
        l += std::exp(score[j] - m);
        o += std::exp(score[j] - m) * value[j];
      }
      lse[s] = r.begin < r.end ? static_cast<float>(m + std::log(l)) : -INFINITY;
      part[s] = r.begin < r.end ? static_cast<float>(o / l) : 0.0f;
    }
    const float got_lse = llada::merged_lse(lse.data(), splits, 1);
    double got_out = 0.0;
    for (int s = 0; s < splits; ++s) got_out += llada::merge_weight(lse[s], got_lse) * part[s];
    CHECK_NEAR(got_lse, want_lse, 1e-4 * (1.0 + std::fabs(want_lse)));
    CHECK_NEAR(got_out, want_out, 1e-4 * (1.0 + std::fabs(want_out)));
  }
  const float none[3] = {-INFINITY, -INFINITY, -INFINITY};
  CHECK(llada::merged_lse(none, 3, 1) == -INFINITY);
  CHECK(llada::merge_weight(-INFINITY, -INFINITY) == 0.0f);
}

}  // namespace

int main() {
  test_key_splits();
  test_split_keys();
  test_merge();
  TEST_MAIN_END();
}
