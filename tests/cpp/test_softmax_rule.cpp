// The block-attention kernels' rule for non-finite scores (csrc/attention/softmax_rule.h) on the CPU: the
// NaN-propagating max, the end of a row (lse, the output factor and element), an online softmax over tiles of a row
// against the dense softmax / logsumexp, and the merge of split-KV runs (key_split.h) by the same rule.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "attention/key_split.h"
#include "attention/softmax_rule.h"
#include "check.h"

namespace {

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

void test_max_nan() {
  CHECK(llada::max_nan(1.0f, 2.0f) == 2.0f);
  CHECK(llada::max_nan(2.0f, 1.0f) == 2.0f);
  CHECK(std::isnan(llada::max_nan(kNan, 1.0f)));
  CHECK(std::isnan(llada::max_nan(1.0f, kNan)));
  CHECK(std::isnan(llada::max_nan(-kInf, kNan)));
  CHECK(std::isnan(llada::max_nan(kInf, kNan)));
  CHECK(llada::max_nan(-kInf, -kInf) == -kInf);
  CHECK(llada::max_nan(-kInf, kInf) == kInf);
}

void test_row_end() {
  CHECK(llada::row_lse(-kInf, std::log(0.0f)) == -kInf);  // saw no key
  CHECK(llada::row_out_scale(-kInf, 0.0f) == 0.0f);
  CHECK(std::isnan(llada::row_lse(kNan, std::log(kNan))));
  CHECK(std::isnan(llada::row_out_scale(kNan, kNan)));
  CHECK(llada::row_lse(kInf, std::log(kNan)) == kInf);
  CHECK(std::isnan(llada::row_out_scale(kInf, kNan)));
  CHECK_NEAR(llada::row_lse(2.0f, std::log(3.0f)), 2.0 + std::log(3.0), 1e-6);
  CHECK_NEAR(llada::row_out_scale(2.0f, 4.0f), 0.25, 0.0);
  CHECK(llada::row_out(kNan, llada::row_out_scale(-kInf, 0.0f)) == 0.0f);  // saw no key: 0, not 0 * NaN
  CHECK(llada::row_out(kInf, 0.0f) == 0.0f);
  CHECK(llada::row_out(3.0f, 0.25f) == 0.75f);
  CHECK(std::isnan(llada::row_out(3.0f, llada::row_out_scale(kNan, kNan))));
}

struct RowEnd {
  float lse, out;
};

// An online softmax over `tile`-sized runs of scores (kept[j] false: masked) with value 1 for every key,
// as the kernels run it: m is the NaN-propagating max, -inf scores weigh 0.
RowEnd online(const std::vector<float>& s, const std::vector<bool>& kept, size_t tile) {
  float m = -kInf, l = 0.0f, o = 0.0f;
  for (size_t t0 = 0; t0 < s.size(); t0 += tile) {
    float mx = -kInf;
    for (size_t j = t0; j < std::min(s.size(), t0 + tile); ++j) mx = llada::max_nan(mx, kept[j] ? s[j] : -kInf);
    const float m_new = llada::max_nan(m, mx);
    if (m_new == -kInf) continue;
    const float alpha = m == -kInf ? 0.0f : std::exp(m - m_new);
    float sum = 0.0f;
    for (size_t j = t0; j < std::min(s.size(), t0 + tile); ++j) {
      const float x = kept[j] ? s[j] : -kInf;
      sum += x == -kInf ? 0.0f : std::exp(x - m_new);
    }
    l = l * alpha + sum;
    o = o * alpha + sum;  // every value is 1: O accumulates as l does
    m = m_new;
  }
  return {llada::row_lse(m, std::log(l)), llada::row_out(o, llada::row_out_scale(m, l))};
}

// The dense reference: logsumexp and softmax-weighted sum of the kept scores, a row seeing no key (every
// kept score -inf, none NaN) giving out 0, lse -inf.
RowEnd dense(const std::vector<float>& s, const std::vector<bool>& kept) {
  bool nan = false, pos_inf = false, seen = false;
  double top = -INFINITY;
  for (size_t j = 0; j < s.size(); ++j) {
    if (!kept[j]) continue;
    nan = nan || std::isnan(s[j]);
    pos_inf = pos_inf || s[j] == kInf;
    seen = seen || s[j] > -kInf;
    if (!std::isnan(s[j])) top = std::max(top, static_cast<double>(s[j]));
  }
  if (nan) return {kNan, kNan};
  if (pos_inf) return {kInf, kNan};
  if (!seen) return {-kInf, 0.0f};
  double sum = 0.0;
  for (size_t j = 0; j < s.size(); ++j)
    if (kept[j]) sum += std::exp(static_cast<double>(s[j]) - top);
  return {static_cast<float>(top + std::log(sum)), 1.0f};
}

void test_online_rows_match_dense() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const float specials[] = {kNan, kInf, -kInf};
  for (int trial = 0; trial < 3000; ++trial) {
    const size_t n = 1 + rng() % 40, tile = 1 + rng() % 9;
    std::vector<float> s(n);
    std::vector<bool> kept(n);
    for (size_t j = 0; j < n; ++j) {
      s[j] = normal(rng);
      kept[j] = rng() % 4 != 0;
    }
    for (unsigned e = rng() % 4; e > 0; --e) s[rng() % n] = specials[rng() % 3];  // kept or masked
    if (trial % 5 == 0)
      for (size_t j = 0; j < n; ++j) s[j] = rng() % 2 ? -kInf : s[j];
    const RowEnd got = online(s, kept, tile), want = dense(s, kept);
    CHECK(same(got.out, want.out) || std::fabs(got.out - want.out) < 1e-5f);
    CHECK(same(got.lse, want.lse) || std::fabs(got.lse - want.lse) < 1e-4f);
  }
}

void test_merge_follows_the_rule() {
  // runs: {lse values}, the merged lse, whether the merged output is NaN
  struct Case {
    std::vector<float> lse;
    float merged;
    bool out_nan;
  };
  const Case cases[] = {
      {{1.0f, -kInf}, 1.0f, false},
      {{-kInf, -kInf}, -kInf, false},
      {{1.0f, kNan}, kNan, true},
      {{kNan, -kInf}, kNan, true},
      {{1.0f, kInf}, kInf, true},
      {{kInf, kNan}, kNan, true},
      {{-kInf, kInf, 2.0f}, kInf, true},
  };
  for (const Case& c : cases) {
    const int n = static_cast<int>(c.lse.size());
    const float merged = llada::merged_lse(c.lse.data(), n, 1);
    CHECK(same(merged, c.merged));
    // Each run's normalised output is 1, NaN after a NaN or +inf score, 0 when it saw nothing.
    float out = 0.0f;
    for (float lse_s : c.lse) {
      const float part = lse_s == -kInf ? 0.0f : (std::isnan(lse_s) || lse_s == kInf ? kNan : 1.0f);
      out += llada::merge_weight(lse_s, merged) * part;
    }
    CHECK(std::isnan(out) == c.out_nan);
  }
}

}  // namespace

int main() {
  test_max_nan();
  test_row_end();
  test_online_rows_match_dense();
  test_merge_follows_the_rule();
  TEST_MAIN_END();
}
