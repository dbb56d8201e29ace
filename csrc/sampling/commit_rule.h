// The commit rule (docs/ARCHITECTURE.md, Token commit), shared by the CPU and CUDA kernels.
//
// Input is one sequence's row of confidences conf[L]: the confidence of the proposed token at a masked
// position, -inf at a position already decoded, NaN where the logits held a NaN. A position is
// eligible when its confidence is a number >= 0. With n_pass eligible positions above the threshold:
//   n_pass >= min_commit  ->  commit exactly those;
//   otherwise             ->  commit the min(min_commit, eligible) most confident, ties to the lower position.
// This is the official LLaDA2.0 generate() rule (threshold, else top-k of the confidence).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace llada {

LLADA_HD bool commit_eligible(float conf) { return conf >= 0.0f; }

struct CommitCounts {
  int64_t eligible = 0;  // masked positions with a valid confidence
  int64_t passing = 0;   // of those, confidence > threshold
};

LLADA_HD CommitCounts commit_counts(const float* conf, int64_t L, float threshold) {
  CommitCounts c;
  for (int64_t j = 0; j < L; ++j) {
    if (!commit_eligible(conf[j])) continue;
    ++c.eligible;
    if (conf[j] > threshold) ++c.passing;
  }
  return c;
}

// Rank of position i among the eligible positions, most confident first, ties to the lower position.
LLADA_HD int64_t commit_rank(const float* conf, int64_t L, int64_t i) {
  const float ci = conf[i];
  int64_t rank = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (!commit_eligible(conf[j])) continue;
    rank += (conf[j] > ci) || (conf[j] == ci && j < i);
  }
  return rank;
}

// Whether position i is committed, given the counts of its sequence.
LLADA_HD bool commit_decision(const float* conf, int64_t L, int64_t i, CommitCounts counts,
                              int64_t min_commit, float threshold) {
  if (!commit_eligible(conf[i])) return false;
  if (counts.passing >= min_commit) return conf[i] > threshold;
  const int64_t take = min_commit < counts.eligible ? min_commit : counts.eligible;
  return commit_rank(conf, L, i) < take;
}

}  // namespace llada
