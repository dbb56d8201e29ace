// C++ CPU kernel of `moe_route` (docs/ARCHITECTURE.md, Mixture of experts): the gate, one token per
// OpenMP iteration, with the per-token rule of route_rule.h (a NaN logit stays in its token's weights).
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/float_bits.h"
#include "llada/moe.h"
#include "moe/route_rule.h"

namespace llada {

namespace {

float load_logit(const void* logits, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(logits)[i];
    case DType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(logits)[i]);
    case DType::kFloat16: return fp16_bits_to_float(static_cast<const uint16_t*>(logits)[i]);
  }
  return 0.0f;
}

}  // namespace

Status moe_route_cpu(const MoeRouteParams& p) {
  const int64_t T = p.tokens, E = p.experts, k = p.top_k;
  if (T < 0 || E < 1 || p.n_group < 1 || E % p.n_group != 0 || p.topk_group < 1 || p.topk_group > p.n_group ||
      k < 1 || k > p.topk_group * (E / p.n_group))
    return Status::kBadArgument;

#pragma omp parallel
  {
    std::vector<float> scores(E), biased(E), group_score(p.n_group);
    std::unique_ptr<bool[]> kept(new bool[p.n_group]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        scores[e] = route_sigmoid(load_logit(p.logits, p.logits_dtype, t * E + e));  // [T, E]
        biased[e] = scores[e] + (p.expert_bias ? p.expert_bias[e] : 0.0f);
      }
      route_token(scores.data(), biased.data(), E, p.n_group, p.topk_group, k, p.routed_scaling_factor,
                  p.norm_topk_prob, kept.get(), group_score.data(), p.topk_ids + t * k,
                  p.topk_weights + t * k);
    }
  }
  return Status::kOk;
}

}  // namespace llada
