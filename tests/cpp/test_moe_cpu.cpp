// The MoE CPU kernels against direct loops: routing ties and group limits, the stable permutation,
// unpermute and its backward, the grouped GEMM (both B layouts, empty groups) and its weight gradient;
// bad offsets and ids rejected.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "llada/moe.h"
#include "moe/route_rule.h"

namespace {

std::vector<float> random_vector(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

void test_route_rule_ties_and_groups() {
  // 8 experts in 4 groups of 2; biased group scores: g0 = 1.0, g1 = 1.0, g2 = 1.2, g3 = 0.2.
  const float biased[8] = {0.5f, 0.5f, 0.9f, 0.1f, 0.6f, 0.6f, 0.1f, 0.1f};
  const float scores[8] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f};
  bool kept[4];
  float group_score[4];
  int32_t ids[3];
  float w[3];
  // Two groups kept: g2 (best), then g0 over g1 (tie, lower index), so expert 2 (the best score) is out.
  // Experts of g0 and g2 by score: 4 and 5 (tie, lower index first), then 0 and 1 (tie) -> 4, 5, 0.
  llada::route_token(scores, biased, 8, 4, 2, 3, 2.0f, true, kept, group_score, ids, w);
  CHECK(kept[0] && !kept[1] && kept[2] && !kept[3]);
  CHECK(ids[0] == 4 && ids[1] == 5 && ids[2] == 0);
  const float sum = 0.5f + 0.6f + 0.1f;
  CHECK_NEAR(w[0], 0.5f / sum * 2.0f, 1e-6);
  CHECK_NEAR(w[2], 0.1f / sum * 2.0f, 1e-6);
  llada::route_token(scores, biased, 8, 4, 2, 2, 1.0f, false, kept, group_score, ids, w);
  CHECK(ids[0] == 4 && ids[1] == 5);
  CHECK_NEAR(w[1], 0.6f, 1e-7);
}

// The CUDA routing warp's split of the rule: 32 lanes each take experts lane, lane + 32, ... and reduce in
// the butterfly order of __shfl_xor_sync. Simulated here, it must give the serial rule's picks bit for bit.
template <class V, class Merge>
V butterfly(std::vector<V> lanes, Merge merge) {
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<V> next(32);
    for (int l = 0; l < 32; ++l) next[l] = merge(lanes[l], lanes[l ^ off]);
    lanes = next;
  }
  return lanes[5];
}

void test_route_rule_split_over_lanes() {
  std::mt19937 rng(4);
  struct Case { int64_t E, n_group, topk_group, k; };
  for (const Case c : {Case{256, 8, 4, 8}, Case{64, 8, 4, 8}, Case{40, 4, 2, 6}, Case{8, 8, 3, 3}, Case{96, 1, 1, 9}}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> scores(c.E), biased(c.E);
      std::uniform_int_distribution<int> level(0, trial % 2 == 0 ? 1000000 : 7);  // odd trials: many ties
      for (int64_t e = 0; e < c.E; ++e) {
        scores[e] = static_cast<float>(level(rng)) / 1000000.0f;
        biased[e] = scores[e] + static_cast<float>(level(rng) % 3) * 0.01f;
      }
      bool kept[8];
      float group_score[8];
      std::vector<int32_t> ids(c.k);
      std::vector<float> w(c.k);
      llada::route_token(scores.data(), biased.data(), c.E, c.n_group, c.topk_group, c.k, 2.5f, true, kept,
                         group_score, ids.data(), w.data());

      const int64_t gs = c.E / c.n_group;
      float lane_group_score[8];
      for (int64_t g = 0; g < c.n_group; ++g) {
        std::vector<llada::Top2> parts(32, llada::top2_empty());
        for (int l = 0; l < 32; ++l)
          for (int64_t i = l; i < gs; i += 32) parts[l] = llada::top2_push(parts[l], biased[g * gs + i]);
        lane_group_score[g] = llada::group_score_of(butterfly(parts, llada::top2_merge));
        CHECK(lane_group_score[g] == group_score[g]);
      }
      bool lane_kept[8];
      llada::keep_groups(lane_group_score, c.n_group, c.topk_group, lane_kept);
      llada::Pick prev = llada::pick_none();
      std::vector<int32_t> lane_ids(c.k);
      for (int64_t j = 0; j < c.k; ++j) {
        std::vector<llada::Pick> parts(32);
        for (int l = 0; l < 32; ++l) parts[l] = llada::best_after(biased.data(), c.E, gs, lane_kept, prev, l, 32);
        prev = butterfly(parts, [](llada::Pick a, llada::Pick b) { return llada::pick_better(b, a) ? b : a; });
        lane_ids[j] = static_cast<int32_t>(prev.index);
      }
      CHECK(lane_ids == ids);
      std::vector<float> lane_w(c.k);
      llada::route_weights(scores.data(), lane_ids.data(), c.k, 2.5f, true, lane_w.data());
      CHECK(lane_w == w);
    }
  }
}

void test_permute_unpermute() {
  const int64_t T = 5, k = 2, H = 3, E = 4;
  const int32_t ids[T * k] = {3, 0, 0, 3, 1, 0, 3, 2, 0, 1};
  std::mt19937 rng(1);
  std::vector<float> x = random_vector(T * H, rng), xs(T * k * H);
  std::vector<int32_t> offsets(E + 1), inverse(T * k);
  llada::MoePermuteParams p;
  p.x = x.data();
  p.topk_ids = ids;
  p.x_sorted = xs.data();
  p.offsets = offsets.data();
  p.inverse = inverse.data();
  p.tokens = T;
  p.hidden = H;
  p.top_k = k;
  p.experts = E;
  CHECK(llada::moe_permute_cpu(p) == llada::Status::kOk);
  const int32_t want_offsets[E + 1] = {0, 4, 6, 7, 10};
  // expert 0: flat 1, 2, 5, 8; expert 1: 4, 9; expert 2: 7; expert 3: 0, 3, 6.
  const int32_t want_inverse[T * k] = {7, 0, 1, 8, 4, 2, 9, 6, 3, 5};
  for (int64_t e = 0; e <= E; ++e) CHECK(offsets[e] == want_offsets[e]);
  for (int64_t i = 0; i < T * k; ++i) {
    CHECK(inverse[i] == want_inverse[i]);
    for (int64_t h = 0; h < H; ++h) CHECK(xs[inverse[i] * H + h] == x[(i / k) * H + h]);
  }

  std::vector<float> w = random_vector(T * k, rng), out(T * H);
  llada::MoeUnpermuteParams u;
  u.y = xs.data();
  u.inverse = inverse.data();
  u.topk_weights = w.data();
  u.out = out.data();
  u.tokens = T;
  u.hidden = H;
  u.top_k = k;
  u.rows = T * k;
  CHECK(llada::moe_unpermute_cpu(u) == llada::Status::kOk);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) CHECK_NEAR(out[t * H + h], (w[t * k] + w[t * k + 1]) * x[t * H + h], 1e-5);

  std::vector<float> dout = random_vector(T * H, rng), dy(T * k * H), dw(T * k);
  llada::MoeUnpermuteBackwardParams bw;
  bw.grad_out = dout.data();
  bw.y = xs.data();
  bw.inverse = inverse.data();
  bw.topk_weights = w.data();
  bw.grad_y = dy.data();
  bw.grad_weights = dw.data();
  bw.tokens = T;
  bw.hidden = H;
  bw.top_k = k;
  bw.rows = T * k;
  CHECK(llada::moe_unpermute_backward_cpu(bw) == llada::Status::kOk);
  for (int64_t i = 0; i < T * k; ++i) {
    double dot = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      dot += dout[(i / k) * H + h] * x[(i / k) * H + h];
      CHECK_NEAR(dy[inverse[i] * H + h], w[i] * dout[(i / k) * H + h], 1e-6);
    }
    CHECK_NEAR(dw[i], dot, 1e-5);
  }

  int32_t bad_ids[T * k];
  for (int64_t i = 0; i < T * k; ++i) bad_ids[i] = ids[i];
  bad_ids[3] = E;
  p.topk_ids = bad_ids;
  CHECK(llada::moe_permute_cpu(p) == llada::Status::kBadArgument);
}

void test_grouped_gemm() {
  const int64_t E = 4, M = 21, N = 37, K = 19;
  const int32_t offsets[E + 1] = {0, 9, 9, 20, 21};  // group 1 empty
  std::mt19937 rng(2);
  std::vector<float> a = random_vector(M * K, rng), b = random_vector(E * N * K, rng), c(M * N);
  std::vector<float> bt(E * K * N);  // the same weights stored [E, K, N]
  for (int64_t g = 0; g < E; ++g)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t kk = 0; kk < K; ++kk) bt[(g * K + kk) * N + n] = b[(g * N + n) * K + kk];
  llada::GroupedGemmParams p;
  p.a = a.data();
  p.offsets = offsets;
  p.c = c.data();
  p.m = M;
  p.n = N;
  p.k = K;
  p.groups = E;
  for (int layout = 0; layout < 2; ++layout) {
    p.b = layout == 0 ? b.data() : bt.data();
    p.b_stride_group = N * K;
    p.b_stride_n = layout == 0 ? K : 1;
    p.b_stride_k = layout == 0 ? 1 : N;
    CHECK(llada::moe_grouped_gemm_cpu(p) == llada::Status::kOk);
    for (int64_t g = 0; g < E; ++g)
      for (int64_t m = offsets[g]; m < offsets[g + 1]; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double want = 0.0;
          for (int64_t kk = 0; kk < K; ++kk) want += a[m * K + kk] * b[(g * N + n) * K + kk];
          CHECK_NEAR(c[m * N + n], want, 1e-4);
        }
  }

  std::vector<float> dc = random_vector(M * N, rng), db(E * N * K, 7.0f);
  llada::GroupedGemmWgradParams w;
  w.grad_c = dc.data();
  w.a = a.data();
  w.offsets = offsets;
  w.grad_b = db.data();
  w.m = M;
  w.n = N;
  w.k = K;
  w.groups = E;
  CHECK(llada::moe_grouped_gemm_wgrad_cpu(w) == llada::Status::kOk);
  for (int64_t g = 0; g < E; ++g)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t kk = 0; kk < K; ++kk) {
        double want = 0.0;
        for (int64_t m = offsets[g]; m < offsets[g + 1]; ++m) want += dc[m * N + n] * a[m * K + kk];
        CHECK_NEAR(db[(g * N + n) * K + kk], want, 1e-4);
      }

  const int32_t not_monotonic[E + 1] = {0, 12, 9, 20, 21};
  const int32_t short_end[E + 1] = {0, 9, 9, 20, 20};
  p.offsets = not_monotonic;
  CHECK(llada::moe_grouped_gemm_cpu(p) == llada::Status::kBadArgument);
  p.offsets = short_end;
  CHECK(llada::moe_grouped_gemm_cpu(p) == llada::Status::kBadArgument);
}

}  // namespace

int main() {
  test_route_rule_ties_and_groups();
  test_route_rule_split_over_lanes();
  test_permute_unpermute();
  test_grouped_gemm();
  TEST_MAIN_END();
}
