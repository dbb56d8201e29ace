// The sampling parameters of one sequence of a commit_tokens call (its own, or the call's scalars), and the
// Philox counter of each of its positions; shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "llada/sampling.h"

namespace llada {

struct SequenceSampling {
  float threshold;
  float temperature;
  int64_t top_k;
  float top_p;
  uint64_t seed;
  uint64_t offset;
};

LLADA_HD SequenceSampling sequence_sampling(const CommitTokensParams& p, int64_t b) {
  const CommitTokensParams::PerSequence& s = p.per_seq;
  return SequenceSampling{s.threshold ? s.threshold[b] : p.threshold,
                          s.temperature ? s.temperature[b] : p.temperature,
                          s.top_k ? static_cast<int64_t>(s.top_k[b]) : p.top_k,
                          s.top_p ? s.top_p[b] : p.top_p,
                          s.seed ? static_cast<uint64_t>(s.seed[b]) : p.seed,
                          s.offset ? static_cast<uint64_t>(s.offset[b]) : p.offset};
}

// Whether any parameter differs per sequence (the CUDA kernels then cannot pick greedy or sampled per call).
LLADA_HD bool has_per_sequence(const CommitTokensParams& p) {
  const CommitTokensParams::PerSequence& s = p.per_seq;
  return s.threshold || s.temperature || s.top_k || s.top_p || s.seed || s.offset;
}

// Greedy: temperature 0 and neither top-k nor top-p on.
LLADA_HD bool is_greedy(const SequenceSampling& s, int64_t vocab) {
  return s.temperature == 0.0f && (s.top_k <= 0 || s.top_k >= vocab) && s.top_p >= 1.0f;
}

// The Philox counter of position l of sequence b (see CommitTokensParams::own_streams).
LLADA_HD uint64_t stream_row(const CommitTokensParams& p, int64_t b, int64_t l) {
  return static_cast<uint64_t>(p.own_streams ? l : b * p.block + l);
}

}  // namespace llada
