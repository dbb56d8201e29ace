// The torch-free CPU kernels of block attention (llada/attention.h) against a naive double-precision
// attention written here: forward (out, lse), backward (dq, dk, dv with dlse) and the decode form, fp32,
// both masks, GQA, packed documents of lengths 1 to 130 with an empty one, odd D.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "attention/block_mask.h"
#include "check.h"
#include "llada/attention.h"

using llada::AttentionMask;

struct Problem {
  std::vector<int32_t> cu;  // [S + 1], queries and keys alike
  int64_t hq, hkv, d;
  AttentionMask mask;
  int64_t block_size;
  float scale;
  std::vector<float> q, k, v, dout, dlse;  // [T, H, D] / [T, Hq]
};

struct Grads {
  std::vector<double> out, lse, dq, dk, dv;
};

// Naive attention per (sequence, head, query) in double, with its analytic gradients.
static Grads naive(const Problem& p) {
  const int64_t T = p.cu.back(), D = p.d, G = p.hq / p.hkv;
  Grads g;
  g.out.assign(T * p.hq * D, 0.0);
  g.lse.assign(T * p.hq, -INFINITY);
  g.dq.assign(T * p.hq * D, 0.0);
  g.dk.assign(T * p.hkv * D, 0.0);
  g.dv.assign(T * p.hkv * D, 0.0);
  for (size_t s = 0; s + 1 < p.cu.size(); ++s) {
    const int64_t c = p.cu[s], n = p.cu[s + 1] - c;
    const llada::DocMask dm{p.mask, p.block_size, n, n};
    for (int64_t h = 0; h < p.hq; ++h) {
      const int64_t hk = h / G;
      for (int64_t i = 0; i < n; ++i) {
        const float* qi = &p.q[((c + i) * p.hq + h) * D];
        std::vector<double> sc(n, -INFINITY), pr(n, 0.0);
        double mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          if (!llada::mask_keep(dm, i, j)) continue;
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += double(qi[x]) * p.k[((c + j) * p.hkv + hk) * D + x];
          sc[j] = dot * p.scale;
          mx = std::max(mx, sc[j]);
        }
        if (mx == -INFINITY) continue;
        double sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += sc[j] == -INFINITY ? 0.0 : std::exp(sc[j] - mx);
        const int64_t row = (c + i) * p.hq + h;
        g.lse[row] = mx + std::log(sum);
        for (int64_t j = 0; j < n; ++j) pr[j] = sc[j] == -INFINITY ? 0.0 : std::exp(sc[j] - g.lse[row]);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t x = 0; x < D; ++x) g.out[row * D + x] += pr[j] * p.v[((c + j) * p.hkv + hk) * D + x];
        // dS_j = P_j (dP_j - sum_k P_k dP_k + dlse), dP_j = dO . V_j
        std::vector<double> dp(n, 0.0);
        double delta = 0;
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t x = 0; x < D; ++x) dp[j] += double(p.dout[row * D + x]) * p.v[((c + j) * p.hkv + hk) * D + x];
          delta += pr[j] * dp[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          const double ds = pr[j] * (dp[j] - delta + p.dlse[row]);
          for (int64_t x = 0; x < D; ++x) {
            g.dq[row * D + x] += p.scale * ds * p.k[((c + j) * p.hkv + hk) * D + x];
            g.dk[((c + j) * p.hkv + hk) * D + x] += p.scale * ds * qi[x];
            g.dv[((c + j) * p.hkv + hk) * D + x] += pr[j] * p.dout[row * D + x];
          }
        }
      }
    }
  }
  return g;
}

static double max_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b[i]) && a[i] == b[i]) continue;
    m = std::max(m, std::fabs(a[i] - b[i]));
  }
  return m;
}

static void check_problem(AttentionMask mask, int64_t block_size, int64_t hq, int64_t hkv, int64_t d,
                          std::vector<int32_t> lengths, uint32_t seed) {
  Problem p;
  p.cu = {0};
  for (int32_t n : lengths) p.cu.push_back(p.cu.back() + n);
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.mask = mask;
  p.block_size = block_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t T = p.cu.back();
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  for (auto* t : {&p.q, &p.dout}) for (int64_t i = 0; i < T * hq * d; ++i) t->push_back(normal(gen));
  for (auto* t : {&p.k, &p.v}) for (int64_t i = 0; i < T * hkv * d; ++i) t->push_back(normal(gen));
  for (int64_t i = 0; i < T * hq; ++i) p.dlse.push_back(normal(gen));

  llada::BlockAttentionParams f;
  f.q = p.q.data();
  f.k = p.k.data();
  f.v = p.v.data();
  f.q_row_stride = hq * d;
  f.q_head_stride = d;
  f.k_row_stride = f.v_row_stride = hkv * d;
  f.k_head_stride = f.v_head_stride = d;
  f.cu_seqlens_q = f.cu_seqlens_k = p.cu.data();
  f.num_seqs = static_cast<int64_t>(lengths.size());
  f.heads_q = hq;
  f.heads_kv = hkv;
  f.head_dim = d;
  f.mask = mask;
  f.block_size = block_size;
  f.softmax_scale = p.scale;
  std::vector<float> out(T * hq * d), lse(T * hq), dq(T * hq * d), dk(T * hkv * d), dv(T * hkv * d);
  f.out = out.data();
  f.lse = lse.data();
  CHECK(llada::block_attention_fwd_cpu(f) == llada::Status::kOk);

  llada::BlockAttentionBwdParams b;
  b.fwd = f;
  b.dout = p.dout.data();
  b.dlse = p.dlse.data();
  b.dq = dq.data();
  b.dk = dk.data();
  b.dv = dv.data();
  CHECK(llada::block_attention_bwd_cpu(b) == llada::Status::kOk);

  const Grads ref = naive(p);
  const double errs[5] = {max_diff(out, ref.out), max_diff(lse, ref.lse), max_diff(dq, ref.dq),
                          max_diff(dk, ref.dk), max_diff(dv, ref.dv)};
  const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
  for (int e = 0; e < 5; ++e) {
    if (!(errs[e] <= 2e-5 * (e >= 2 ? 10 : 1))) {
      std::fprintf(stderr, "mask %d bs %lld heads %lld/%lld D %lld: %s error %.3g\n", static_cast<int>(mask),
                   (long long)block_size, (long long)hq, (long long)hkv, (long long)d, names[e], errs[e]);
      CHECK(false);
    }
  }
}

// The decode form equals the varlen forward over [cache | block] with block_causal and block_size Lb.
static void check_decode(int64_t lb, uint32_t seed) {
  const int64_t B = 3, hq = 4, hkv = 2, d = 20, smax = 4 * lb;
  const int32_t cached[B] = {0, static_cast<int32_t>(lb), static_cast<int32_t>(3 * lb)};
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = normal(gen);
    return x;
  };
  const std::vector<float> q = randn(B * lb * hq * d), kn = randn(B * lb * hkv * d), vn = randn(B * lb * hkv * d);
  const std::vector<float> kc = randn(B * smax * hkv * d), vc = randn(B * smax * hkv * d);
  llada::BlockAttentionDecodeParams p;
  p.q = q.data();
  p.k_cache = kc.data();
  p.v_cache = vc.data();
  p.cache_seqlens = cached;
  p.k_new = kn.data();
  p.v_new = vn.data();
  p.batch = B;
  p.block = lb;
  p.cache_capacity = smax;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.head_dim = d;
  p.softmax_scale = 0.3f;
  std::vector<float> out(B * lb * hq * d), lse(B * lb * hq);
  p.out = out.data();
  p.lse = lse.data();
  CHECK(llada::block_attention_decode_cpu(p) == llada::Status::kOk);

  // The same sequences packed: rows [cache | block] per sequence, queries only for the block.
  std::vector<int32_t> cu_q{0}, cu_k{0};
  std::vector<float> k, v;
  for (int64_t b = 0; b < B; ++b) {
    cu_q.push_back(cu_q.back() + static_cast<int32_t>(lb));
    cu_k.push_back(cu_k.back() + cached[b] + static_cast<int32_t>(lb));
    for (int64_t r = 0; r < cached[b]; ++r)
      for (int64_t x = 0; x < hkv * d; ++x) {
        k.push_back(kc[(b * smax + r) * hkv * d + x]);
        v.push_back(vc[(b * smax + r) * hkv * d + x]);
      }
    k.insert(k.end(), kn.begin() + b * lb * hkv * d, kn.begin() + (b + 1) * lb * hkv * d);
    v.insert(v.end(), vn.begin() + b * lb * hkv * d, vn.begin() + (b + 1) * lb * hkv * d);
  }
  llada::BlockAttentionParams f;
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.q_row_stride = hq * d;
  f.q_head_stride = d;
  f.k_row_stride = f.v_row_stride = hkv * d;
  f.k_head_stride = f.v_head_stride = d;
  f.cu_seqlens_q = cu_q.data();
  f.cu_seqlens_k = cu_k.data();
  f.num_seqs = B;
  f.heads_q = hq;
  f.heads_kv = hkv;
  f.head_dim = d;
  f.block_size = lb;
  f.softmax_scale = 0.3f;
  std::vector<float> full(out.size()), full_lse(lse.size());
  f.out = full.data();
  f.lse = full_lse.data();
  CHECK(llada::block_attention_fwd_cpu(f) == llada::Status::kOk);
  double err = 0;
  for (size_t i = 0; i < out.size(); ++i) err = std::max(err, double(std::fabs(out[i] - full[i])));
  for (size_t i = 0; i < lse.size(); ++i) err = std::max(err, double(std::fabs(lse[i] - full_lse[i])));
  if (!(err <= 1e-5)) {
    std::fprintf(stderr, "decode Lb %lld: error %.3g against the varlen forward\n", (long long)lb, err);
    CHECK(false);
  }
}

int main() {
  const std::vector<int32_t> docs{1, 7, 64, 0, 65, 130};
  const std::vector<int32_t> bd3_docs{2, 14, 64, 0, 66, 130};
  for (int64_t bs : {1, 4, 32, 1000}) {
    check_problem(AttentionMask::kBlockCausal, bs, 4, 2, 24, docs, 1 + static_cast<uint32_t>(bs));
    check_problem(AttentionMask::kBd3, bs, 4, 4, 17, bd3_docs, 2 + static_cast<uint32_t>(bs));
  }
  check_problem(AttentionMask::kBd3, 3, 6, 2, 64, bd3_docs, 3);
  for (int64_t lb : {1, 5, 32, 70}) check_decode(lb, 4 + static_cast<uint32_t>(lb));
  TEST_MAIN_END();
}
