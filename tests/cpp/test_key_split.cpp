// Split-KV of the CUDA decode form (csrc/attention/key_split.h) on the CPU: the run count, the runs of a fixed
// number of keys (disjoint, cut at fixed positions, covering the keys), and the merge of partial outputs
// against one softmax over all keys, with empty runs among them; a single run merges to exactly itself.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "attention/key_split.h"
#include "check.h"

using llada::RowRange;

namespace {

void test_key_splits() {
  const int64_t K = llada::kKeysPerSplit;
  CHECK(K % 64 == 0);  // whole key tiles of the CUDA kernel
  CHECK(llada::key_splits(0) == 1);
  CHECK(llada::key_splits(1) == 1);
  CHECK(llada::key_splits(K) == 1);
  CHECK(llada::key_splits(K + 1) == 2);
  CHECK(llada::key_splits(4096 + 32) == static_cast<int>((4096 + 32 + K - 1) / K));
}

// The runs of a key range: consecutive, disjoint, covering it, cut only at multiples of kKeysPerSplit, and the
// same whatever the number of runs the grid holds (that number follows the longest sequence of the batch).
void test_split_keys() {
  const int64_t K = llada::kKeysPerSplit;
  std::mt19937 rng(3);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t begin = trial % 4 == 0 ? 0 : rng() % 3000, end = begin + rng() % 5000;
    const int needed = llada::key_splits(end);
    const int splits = needed + static_cast<int>(rng() % 5);  // a batch with longer sequences: more runs
    int64_t at = begin;
    for (int s = 0; s < splits; ++s) {
      const RowRange r = llada::split_keys(RowRange{begin, end}, s);
      if (r.begin >= r.end) {
        CHECK(r.begin == r.end);
        CHECK(s >= needed || (s + 1) * K <= begin);  // empty only before the range or past its end
        continue;
      }
      CHECK(r.begin == at);                                   // consecutive and disjoint
      CHECK(r.begin == begin || r.begin == s * K);            // cut at fixed positions
      CHECK(r.end == end || r.end == (s + 1) * K);
      CHECK(r.end - r.begin <= K);
      at = r.end;
    }
    CHECK(at == (begin < end ? end : begin));                 // covering
  }
  const RowRange none = llada::split_keys(RowRange{5, 5}, 0);
  CHECK(none.begin == none.end);
}

void test_merge() {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % (4 * llada::kKeysPerSplit));
    const int splits = llada::key_splits(n) + static_cast<int>(rng() % 3);
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
      const RowRange r = llada::split_keys(RowRange{0, n}, s);
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

// A sequence whose keys fit in one run, in a grid of several: the merge (in the order merge_splits_kernel
// adds) gives back that run's lse and output bit for bit, i.e. exactly what the unsplit kernel writes.
void test_single_run_is_exact() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 30.0f);
  for (int trial = 0; trial < 1000; ++trial) {
    const int splits = 2 + static_cast<int>(rng() % 40);
    std::vector<float> lse(splits, -INFINITY), part(splits, 0.0f);
    lse[0] = normal(rng);
    part[0] = normal(rng);
    const float merged = llada::merged_lse(lse.data(), splits, 1);
    float out = 0.0f;
    for (int s = 0; s < splits; ++s) out += llada::merge_weight(lse[s], merged) * part[s];
    CHECK(merged == lse[0]);
    CHECK(out == part[0]);
  }
}

}  // namespace

int main() {
  test_single_run_is_exact();
  test_key_splits();
  test_split_keys();
  test_merge();
  TEST_MAIN_END();
}
