// The shared commit rule: threshold path, top-m fallback, ties to the lower position, NaN and
// already-decoded positions never committed.
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "sampling/commit_rule.h"

static std::vector<bool> decide(const std::vector<float>& conf, int64_t min_commit, float threshold) {
  const int64_t L = static_cast<int64_t>(conf.size());
  const llada::CommitCounts c = llada::commit_counts(conf.data(), L, threshold);
  std::vector<bool> out(L);
  for (int64_t i = 0; i < L; ++i) out[i] = llada::commit_decision(conf.data(), L, i, c, min_commit, threshold);
  return out;
}

int main() {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  // Two pass the threshold, min_commit 1: exactly those two.
  CHECK((decide({0.99f, 0.2f, 0.97f, ninf}, 1, 0.95f) == std::vector<bool>{true, false, true, false}));
  // None pass, min_commit 2: the two most confident.
  CHECK((decide({0.3f, 0.5f, 0.1f, 0.4f}, 2, 0.95f) == std::vector<bool>{false, true, false, true}));
  // Ties go to the lower position.
  CHECK((decide({0.5f, 0.5f, 0.5f}, 1, 0.95f) == std::vector<bool>{true, false, false}));
  // min_commit above the masked count commits every masked position, never a decoded one.
  CHECK((decide({0.1f, ninf, 0.2f}, 5, 0.95f) == std::vector<bool>{true, false, true}));
  // One passes but min_commit is 2: fall back to the top 2.
  CHECK((decide({0.99f, 0.3f, 0.6f}, 2, 0.95f) == std::vector<bool>{true, false, true}));
  // Nothing masked: nothing committed.
  CHECK((decide({ninf, ninf}, 3, 0.5f) == std::vector<bool>{false, false}));
  // NaN rows are never committed and do not count.
  CHECK((decide({nan, 0.2f, 0.1f}, 1, 0.95f) == std::vector<bool>{false, true, false}));
  // min_commit 0 and nothing above the threshold: nothing.
  CHECK((decide({0.2f, 0.3f}, 0, 0.95f) == std::vector<bool>{false, false}));
  // Confidence exactly at the threshold does not pass (strict >).
  CHECK((decide({0.95f, 0.1f}, 0, 0.95f) == std::vector<bool>{false, false}));
  TEST_MAIN_END();
}
