// The LLaDA2 gate for one token, shared by the CPU and CUDA routing kernels.
//
// scores = sigmoid(logits); biased = scores + expert_bias (selection only). A group's score is the sum
// of its top-2 biased scores (its one score when a group holds one expert); the topk_group best groups
// are kept; the top_k best experts of the kept groups are chosen, listed by descending biased score.
// Ties go to the lower group / expert index. Weights: the unbiased scores of the chosen experts,
// divided by (their sum + 1e-20) when norm_topk_prob, times routed_scaling_factor.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace llada {

LLADA_HD float route_sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + std::exp(-x));
#endif
}

// scores [E] unbiased, biased [E] = scores + bias (no NaN); kept_group, group_score [n_group] scratch;
// ids, weights [k] out.
LLADA_HD void route_token(const float* scores, const float* biased, int64_t E, int64_t n_group,
                          int64_t topk_group, int64_t top_k, float scale, bool norm, bool* kept_group,
                          float* group_score, int32_t* ids, float* weights) {
  const int64_t group_size = E / n_group;
  for (int64_t g = 0; g < n_group; ++g) {
    const float* s = biased + g * group_size;
    float first = s[0];
    float second = 0.0f;
    bool has_second = false;
    for (int64_t i = 1; i < group_size; ++i) {
      if (s[i] > first) {
        second = first;
        first = s[i];
      } else if (!has_second || s[i] > second) {
        second = s[i];
      }
      has_second = true;
    }
    group_score[g] = has_second ? first + second : first;
    kept_group[g] = false;
  }
  for (int64_t j = 0; j < topk_group; ++j) {
    int64_t best = -1;
    for (int64_t g = 0; g < n_group; ++g)
      if (!kept_group[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
    kept_group[best] = true;
  }
  // The j-th pick is the best expert that comes after the (j-1)-th in (descending score, ascending index).
  float sum = 0.0f;
  float prev_score = 0.0f;
  int64_t prev = -1;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (!kept_group[e / group_size]) continue;
      const bool after = prev < 0 || biased[e] < prev_score || (biased[e] == prev_score && e > prev);
      if (after && (best < 0 || biased[e] > biased[best])) best = e;
    }
    ids[j] = static_cast<int32_t>(best);
    weights[j] = scores[best];
    sum += scores[best];
    prev = best;
    prev_score = biased[best];
  }
  for (int64_t j = 0; j < top_k; ++j) weights[j] = (norm ? weights[j] / (sum + 1e-20f) : weights[j]) * scale;
}

}  // namespace llada
