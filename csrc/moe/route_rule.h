// The LLaDA2 gate for one token, shared by the CPU and CUDA routing kernels.
//
// scores = sigmoid(logits); biased = scores + expert_bias (selection only). A group's score is the sum
// of its top-2 biased scores (its one score when a group holds one expert); the topk_group best groups
// are kept; the top_k best experts of the kept groups are chosen, listed by descending biased score.
// Ties go to the lower group / expert index. Weights: the unbiased scores of the chosen experts,
// divided by (their sum + 1e-20) when norm_topk_prob, times routed_scaling_factor.
//
// A NaN ranks above every number and ties with another NaN, as in the reference's torch.topk and stable
// descending torch.sort: a NaN logit (or bias) makes its group's score NaN and ranks that group and that
// expert first. The token's weights then hold NaN (all of them with norm_topk_prob, else the NaN expert's),
// its ids stay valid experts, and no other token is touched: a NaN in one sequence of a batch shows in
// that sequence's rows only.
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

// a ranks above b in the order of the rule: descending, NaN first.
LLADA_HD bool ranks_above(float a, float b) { return a != a ? b == b : a > b; }

// a and b rank equal: equal numbers, or both NaN.
LLADA_HD bool ranks_equal(float a, float b) { return a == b || (a != a && b != b); }

// The rule is built from pieces that merge in any order, so that a CUDA warp can split a token's experts
// over its lanes and reduce with shuffles to exactly what the serial loop gives.

// The two largest values of a set (count: how many values were pushed, capped at 2).
struct Top2 {
  float first;
  float second;
  int count;
};

LLADA_HD Top2 top2_empty() { return Top2{-INFINITY, -INFINITY, 0}; }

LLADA_HD Top2 top2_push(Top2 t, float x) {
  if (t.count == 0 || ranks_above(x, t.first)) {
    t.second = t.first;
    t.first = x;
  } else if (t.count == 1 || ranks_above(x, t.second)) {
    t.second = x;
  }
  t.count = t.count < 2 ? t.count + 1 : 2;
  return t;
}

LLADA_HD Top2 top2_merge(Top2 a, Top2 b) {
  if (b.count > 0) a = top2_push(a, b.first);
  if (b.count > 1) a = top2_push(a, b.second);
  return a;
}

// A group's score: the sum of its top-2 biased scores, or its one score when it holds one expert.
LLADA_HD float group_score_of(Top2 t) { return t.count >= 2 ? t.first + t.second : t.first; }

// Keeps the topk_group best groups (ties to the lower index).
LLADA_HD void keep_groups(const float* group_score, int64_t n_group, int64_t topk_group, bool* kept_group) {
  for (int64_t g = 0; g < n_group; ++g) kept_group[g] = false;
  for (int64_t j = 0; j < topk_group; ++j) {
    int64_t best = -1;
    for (int64_t g = 0; g < n_group; ++g)
      if (!kept_group[g] && (best < 0 || ranks_above(group_score[g], group_score[best]))) best = g;
    kept_group[best] = true;
  }
}

// An expert with its biased score; index -1 is no expert. Order: descending score (NaN first), then
// ascending index.
struct Pick {
  float score;
  int64_t index;
};

LLADA_HD Pick pick_none() { return Pick{0.0f, -1}; }

LLADA_HD bool pick_better(Pick a, Pick b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  return ranks_above(a.score, b.score) || (ranks_equal(a.score, b.score) && a.index < b.index);
}

// The best expert among e = first, first + stride, ... < E in kept groups that ranks after `prev`.
LLADA_HD Pick best_after(const float* biased, int64_t E, int64_t group_size, const bool* kept_group, Pick prev,
                         int64_t first, int64_t stride) {
  Pick best = pick_none();
  for (int64_t e = first; e < E; e += stride) {
    if (!kept_group[e / group_size]) continue;
    const Pick c{biased[e], e};
    if (prev.index >= 0 && !pick_better(prev, c)) continue;
    if (pick_better(c, best)) best = c;
  }
  return best;
}

// Weights of the chosen experts from the unbiased scores, in pick order.
LLADA_HD void route_weights(const float* scores, const int32_t* ids, int64_t top_k, float scale, bool norm,
                            float* weights) {
  float sum = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) sum += scores[ids[j]];
  for (int64_t j = 0; j < top_k; ++j) weights[j] = (norm ? scores[ids[j]] / (sum + 1e-20f) : scores[ids[j]]) * scale;
}

// The serial rule. scores [E] unbiased, biased [E] = scores + bias (NaN allowed); kept_group, group_score
// [n_group] scratch; ids, weights [k] out.
LLADA_HD void route_token(const float* scores, const float* biased, int64_t E, int64_t n_group,
                          int64_t topk_group, int64_t top_k, float scale, bool norm, bool* kept_group,
                          float* group_score, int32_t* ids, float* weights) {
  const int64_t group_size = E / n_group;
  for (int64_t g = 0; g < n_group; ++g) {
    Top2 t = top2_empty();
    for (int64_t i = 0; i < group_size; ++i) t = top2_push(t, biased[g * group_size + i]);
    group_score[g] = group_score_of(t);
  }
  keep_groups(group_score, n_group, topk_group, kept_group);
  Pick prev = pick_none();
  for (int64_t j = 0; j < top_k; ++j) {
    prev = best_after(biased, E, group_size, kept_group, prev, 0, 1);
    ids[j] = static_cast<int32_t>(prev.index);
  }
  route_weights(scores, ids, top_k, scale, norm, weights);
}

}  // namespace llada
