// C++ CPU backward (docs/ARCHITECTURE.md, Block attention): dq, dk, dv from dout, the forward's out and
// lse, recomputing the probabilities tile by tile (FlashAttention-2), with the forward's tile skipping.
//
// Keys and values are converted once to fp32 tiles (attention/kv_tiles.h). Two passes, no atomics,
// deterministic:
//   A. task (sequence, query tile, query head): delta = rowsum(dout * out) - dlse, then over key tiles
//      P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   B. task (sequence, KG consecutive key tiles, kv head): over the query heads of the group and the
//      query tiles that see the keys, recompute S^T, P^T, dP^T, dS^T and accumulate dV += P^T dO,
//      dK += dS^T Q; a query tile is loaded (and transposed) once for the KG key tiles.
// S is computed from scale * q, so dK needs no extra scale and dQ = scale * dS K.
#include <omp.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "attention/block_mask.h"
#include "attention/cpu_tile.h"
#include "attention/kv_tiles.h"
#include "llada/attention.h"

namespace llada {
namespace {

using cpu::BK;
using cpu::BQ;
using cpu::kNegInf;
constexpr int64_t KG = 4;  // key tiles per pass-B task

struct BwdScratch {
  explicit BwdScratch(int64_t D)
      : q(BQ * D), qt(D * BQ), dout(BQ * D), doutt(D * BQ), s(BQ * BK), dp(BQ * BK), acc(std::max(BQ, KG * BK) * D),
        acc2(KG * BK * D), row(D), lse(BQ), delta(BQ) {}
  std::vector<float> q, qt;        // [BQ, D], [D, BQ] scaled queries
  std::vector<float> dout, doutt;  // [BQ, D], [D, BQ]
  std::vector<float> s, dp;        // [BQ, BK] (pass A) or [BK, BQ] (pass B)
  std::vector<float> acc, acc2;    // dQ [BQ, D] (pass A); dK, dV [KG * BK, D] (pass B)
  std::vector<float> row;          // [D]
  std::vector<float> lse, delta;   // [BQ]
  cpu::TileCoords qc, kc;
};

struct Views {
  const BlockAttentionBwdParams& p;
  size_t esize;

  LLADA_CPU_INLINE const char* elem(const void* base, int64_t e) const {
    return static_cast<const char*>(base) + static_cast<size_t>(e) * esize;
  }
  LLADA_CPU_INLINE cpu::Rows q(int64_t row, int64_t h) const {
    return {elem(p.fwd.q, row * p.fwd.q_row_stride + h * p.fwd.q_head_stride), p.fwd.q_row_stride, p.fwd.dtype};
  }
  // Contiguous [T, H, D] tensors (out, dout).
  LLADA_CPU_INLINE cpu::Rows dense(const void* base, int64_t row, int64_t h) const {
    return {elem(base, (row * p.fwd.heads_q + h) * p.fwd.head_dim), p.fwd.heads_q * p.fwd.head_dim, p.fwd.dtype};
  }
};

// s := dS = P (dP - delta_i) with P = exp(s - lse_i) on the kept entries and exactly 0 elsewhere (s = -inf,
// whatever dP and delta_i: a NaN there must not reach the keys the row does not see), for nr query rows of
// ld keys.
LLADA_CPU_INLINE void softmax_grad_rows(float* s, const float* dp, int64_t nr, int64_t ld, const float* lse,
                                        const float* delta) {
  for (int64_t i = 0; i < nr; ++i) {
    float* si = s + i * ld;
    const float* dpi = dp + i * ld;
    const float di = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < ld; ++j) {
      const float e = exp_nonpositive(si[j] - lse[i]);
      si[j] = si[j] == kNegInf ? 0.0f : e * (dpi[j] - di);
    }
  }
}

LLADA_CPU_MULTIVERSION void dq_task(const BlockAttentionBwdParams& p, const cpu::KvTiles& kv, BwdScratch& w,
                              float* delta_out, int64_t seq, int64_t q_tile, int64_t h) {
  const BlockAttentionParams& f = p.fwd;
  const Views at{p, cpu::dtype_bytes(f.dtype)};
  const int64_t D = f.head_dim, Hq = f.heads_q;
  const int64_t cq = f.cu_seqlens_q[seq], ck = f.cu_seqlens_k[seq];
  const DocMask dm{f.mask, f.block_size, f.cu_seqlens_q[seq + 1] - cq, f.cu_seqlens_k[seq + 1] - ck};
  const int64_t q0 = q_tile * BQ, nq = std::min(BQ, dm.len_q - q0);
  const int64_t hk = h / (Hq / f.heads_kv);

  cpu::load_tile(w.q.data(), at.q(cq + q0, h), nq, nq, D, f.softmax_scale);
  cpu::load_tile(w.dout.data(), at.dense(p.dout, cq + q0, h), nq, nq, D, 1.0f);
  const cpu::Rows out = at.dense(f.out, cq + q0, h);
  for (int64_t i = 0; i < nq; ++i) {
    cpu::load_row(w.row.data(), out.row(i), f.dtype, D, 1.0f);
    const float* di = w.dout.data() + i * D;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += di[d] * w.row[d];
    const int64_t t = (cq + q0 + i) * Hq + h;
    w.delta[i] = dot - (p.dlse ? p.dlse[t] : 0.0f);
    w.lse[i] = f.lse[t];
    delta_out[t] = w.delta[i];
  }
  cpu::query_coords(w.qc, dm, q0, nq);
  std::fill(w.acc.begin(), w.acc.begin() + nq * D, 0.0f);

  const RowRange keys = key_range(dm, q0, q0 + nq);
  for (int64_t k0 = (keys.begin / BK) * BK; k0 < keys.end; k0 += BK) {
    const int64_t nk = std::min(BK, dm.len_k - k0);
    const TileKind kind = classify_tile(dm, q0, q0 + nq, k0, k0 + nk);
    if (kind == TileKind::kSkip) continue;
    float* s = w.s.data();
    cpu::gemm<false>(nq, BK, D, w.q.data(), D, kv.at(kv.kt, seq, k0, hk), BK, s, BK);             // S = Q K^T
    cpu::gemm<false>(nq, BK, D, w.dout.data(), D, kv.at(kv.vt, seq, k0, hk), BK, w.dp.data(), BK);  // dP = dO V^T
    if (kind == TileKind::kPartial) cpu::key_coords(w.kc, dm, k0, nk);
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * BK;
      if (kind == TileKind::kPartial) cpu::mask_row(si, f.mask, w.qc.block[i], w.qc.clean[i], w.kc, nk);
      for (int64_t j = nk; j < BK; ++j) si[j] = kNegInf;
    }
    softmax_grad_rows(s, w.dp.data(), nq, BK, w.lse.data(), w.delta.data());
    cpu::gemm<true>(nq, D, nk, s, BK, kv.at(kv.k, seq, k0, hk), D, w.acc.data(), D);  // dQ += dS K
  }
  char* dq = static_cast<char*>(p.dq) + static_cast<size_t>(((cq + q0) * Hq + h) * D) * at.esize;
  for (int64_t i = 0; i < nq; ++i) {
    float* ai = w.acc.data() + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ai[d] *= f.softmax_scale;
    cpu::store_row(dq + static_cast<size_t>(i * Hq * D) * at.esize, ai, f.dtype, D);
  }
}

LLADA_CPU_MULTIVERSION void dkv_task(const BlockAttentionBwdParams& p, const cpu::KvTiles& kv, BwdScratch& w,
                               const float* delta, int64_t seq, int64_t group_index, int64_t hk) {
  const BlockAttentionParams& f = p.fwd;
  const Views at{p, cpu::dtype_bytes(f.dtype)};
  const int64_t D = f.head_dim, Hq = f.heads_q, group = Hq / f.heads_kv;
  const int64_t cq = f.cu_seqlens_q[seq], ck = f.cu_seqlens_k[seq];
  const DocMask dm{f.mask, f.block_size, f.cu_seqlens_q[seq + 1] - cq, f.cu_seqlens_k[seq + 1] - ck};
  const int64_t k_begin = group_index * KG * BK, k_end = std::min(k_begin + KG * BK, dm.len_k);
  float* dk = w.acc.data();  // [k_end - k_begin, D]
  float* dv = w.acc2.data();
  std::fill(dk, dk + (k_end - k_begin) * D, 0.0f);
  std::fill(dv, dv + (k_end - k_begin) * D, 0.0f);

  TileKind kinds[KG];
  const RowRange rows = query_range(dm, k_begin, k_end);
  for (int64_t q0 = (rows.begin / BQ) * BQ; q0 < rows.end; q0 += BQ) {
    const int64_t nq = std::min(BQ, dm.len_q - q0);
    bool any = false;
    for (int64_t g = 0; g < KG; ++g) {
      const int64_t k0 = k_begin + g * BK;
      kinds[g] = k0 < k_end ? classify_tile(dm, q0, q0 + nq, k0, std::min(k0 + BK, k_end)) : TileKind::kSkip;
      any = any || kinds[g] != TileKind::kSkip;
    }
    if (!any) continue;
    cpu::query_coords(w.qc, dm, q0, nq);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const cpu::Rows q = at.q(cq + q0, h), dout = at.dense(p.dout, cq + q0, h);
      cpu::load_tile(w.q.data(), q, nq, BQ, D, f.softmax_scale);
      cpu::load_tile_transposed(w.qt.data(), BQ, q, nq, D, f.softmax_scale, w.row.data());
      cpu::load_tile(w.dout.data(), dout, nq, BQ, D, 1.0f);
      cpu::load_tile_transposed(w.doutt.data(), BQ, dout, nq, D, 1.0f, w.row.data());
      for (int64_t i = 0; i < nq; ++i) {
        w.lse[i] = f.lse[(cq + q0 + i) * Hq + h];
        w.delta[i] = delta[(cq + q0 + i) * Hq + h];
      }
      for (int64_t g = 0; g < KG; ++g) {
        if (kinds[g] == TileKind::kSkip) continue;
        const int64_t k0 = k_begin + g * BK, nk = std::min(BK, k_end - k0);
        if (kinds[g] == TileKind::kPartial) cpu::key_coords(w.kc, dm, k0, nk);
        float* st = w.s.data();  // [nk, BQ]
        float* dpt = w.dp.data();
        cpu::gemm<false>(nk, BQ, D, kv.at(kv.k, seq, k0, hk), D, w.qt.data(), BQ, st, BQ);      // S^T = K Q^T
        cpu::gemm<false>(nk, BQ, D, kv.at(kv.v, seq, k0, hk), D, w.doutt.data(), BQ, dpt, BQ);  // dP^T = V dO^T
        for (int64_t j = 0; j < nk; ++j) {
          float* sj = st + j * BQ;
          float* dj = dpt + j * BQ;
          if (kinds[g] == TileKind::kPartial) {
            const MaskCoord kc{w.kc.block[j], w.kc.clean[j]};
            for (int64_t i = 0; i < nq; ++i)
              if (!coords_keep(f.mask, MaskCoord{w.qc.block[i], w.qc.clean[i]}, kc)) sj[i] = kNegInf;
          }
#pragma omp simd
          for (int64_t i = 0; i < nq; ++i) {
            const float e = exp_nonpositive(sj[i] - w.lse[i]);
            const bool kept = sj[i] != kNegInf;
            sj[i] = kept ? e : 0.0f;
            dj[i] = kept ? e * (dj[i] - w.delta[i]) : 0.0f;
          }
          for (int64_t i = nq; i < BQ; ++i) sj[i] = dj[i] = 0.0f;
        }
        float* dv_g = dv + (k0 - k_begin) * D;
        float* dk_g = dk + (k0 - k_begin) * D;
        cpu::gemm<true>(nk, D, nq, st, BQ, w.dout.data(), D, dv_g, D);  // dV += P^T dO
        cpu::gemm<true>(nk, D, nq, dpt, BQ, w.q.data(), D, dk_g, D);    // dK += dS^T Q
      }
    }
  }
  const int64_t Hkv = f.heads_kv;
  char* dk_out = static_cast<char*>(p.dk) + static_cast<size_t>(((ck + k_begin) * Hkv + hk) * D) * at.esize;
  char* dv_out = static_cast<char*>(p.dv) + static_cast<size_t>(((ck + k_begin) * Hkv + hk) * D) * at.esize;
  for (int64_t j = 0; j < k_end - k_begin; ++j) {
    cpu::store_row(dk_out + static_cast<size_t>(j * Hkv * D) * at.esize, dk + j * D, f.dtype, D);
    cpu::store_row(dv_out + static_cast<size_t>(j * Hkv * D) * at.esize, dv + j * D, f.dtype, D);
  }
}

}  // namespace

Status block_attention_bwd_cpu(const BlockAttentionBwdParams& p) {
  const BlockAttentionParams& f = p.fwd;
  if (f.dtype == DType::kFloat16 || f.block_size < 1 || f.heads_kv < 1 || f.heads_q % f.heads_kv != 0)
    return Status::kBadArgument;
  std::vector<std::pair<int64_t, int64_t>> q_tiles, k_groups;  // (sequence, query tile / group of KG key tiles)
  for (int64_t s = 0; s < f.num_seqs; ++s) {
    const int64_t len_q = f.cu_seqlens_q[s + 1] - f.cu_seqlens_q[s];
    const int64_t len_k = f.cu_seqlens_k[s + 1] - f.cu_seqlens_k[s];
    for (int64_t t = 0; t * BQ < len_q; ++t) q_tiles.emplace_back(s, t);
    for (int64_t g = 0; g * KG * BK < len_k; ++g) k_groups.emplace_back(s, g);
  }
  const cpu::KvTiles kv = cpu::make_kv_tiles(f, cpu::kKeysT | cpu::kKeys | cpu::kValues | cpu::kValuesT);
  const int64_t Tq = f.num_seqs > 0 ? f.cu_seqlens_q[f.num_seqs] : 0;
  std::vector<float> delta(static_cast<size_t>(Tq * f.heads_q));  // [Tq, Hq]
  const int64_t a_tasks = static_cast<int64_t>(q_tiles.size()) * f.heads_q;
  const int64_t b_tasks = static_cast<int64_t>(k_groups.size()) * f.heads_kv;
#pragma omp parallel
  {
    BwdScratch w(f.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < a_tasks; ++task) {
      const auto& [s, t] = q_tiles[task / f.heads_q];
      dq_task(p, kv, w, delta.data(), s, t, task % f.heads_q);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < b_tasks; ++task) {
      const auto& [s, g] = k_groups[task / f.heads_kv];
      dkv_task(p, kv, w, delta.data(), s, g, task % f.heads_kv);
    }
  }
  return Status::kOk;
}

}  // namespace llada
