// C++ CPU forward (docs/ARCHITECTURE.md, Block attention): the varlen document-masked forward and the
// decode-time form against a per-sequence cache, contiguous or paged.
//
// One task is (sequence, query tile of BQ rows, query head). It keeps the tile's output, running max
// and running sum in fp32 and walks the key tiles of the sequence with an online softmax
// (FlashAttention-2): key tiles the mask removes are skipped, full tiles run without the mask,
// partial tiles compare mask coordinates per element. Keys and values are first converted to fp32
// key tiles (transposed, [D, BK]) and value tiles ([BK, D]) once per call, so that the G query heads
// of a GQA group and every query tile share them. Memory is O(T + threads x tile), never O(T^2).
#include <omp.h>

#include <utility>
#include <vector>

#include "attention/block_mask.h"
#include "attention/cpu_tile.h"
#include "attention/kv_tiles.h"
#include "attention/softmax_rule.h"
#include "llada/attention.h"

namespace llada {
namespace {

using cpu::BK;
using cpu::BQ;
using cpu::kNegInf;

// Per-thread buffers of one query tile.
struct FwdScratch {
  explicit FwdScratch(int64_t D)
      : q(BQ * D), o(BQ * D), s(BQ * BK), kt(D * BK), v(BK * D), row(D), m(BQ), l(BQ) {}
  std::vector<float> q;   // [BQ, D] scaled queries
  std::vector<float> o;   // [BQ, D] unnormalised output
  std::vector<float> s;   // [BQ, BK] scores, then probabilities
  std::vector<float> kt;  // [D, BK] keys, transposed (decode: loaded per tile, shared by a GQA group)
  std::vector<float> v;   // [BK, D] (decode)
  std::vector<float> row;  // [D]
  std::vector<float> m;   // [BQ] running max of the scaled scores
  std::vector<float> l;   // [BQ] running sum of exp(score - m)
  cpu::TileCoords qc, kc;
};

// The online-softmax state of one query tile of nq rows.
struct OnlineTile {
  FwdScratch& w;
  int64_t nq;
  int64_t D;

  LLADA_CPU_INLINE void begin(const cpu::Rows& q, float scale) {
    cpu::load_tile(w.q.data(), q, nq, nq, D, scale);
    std::fill(w.o.begin(), w.o.begin() + nq * D, 0.0f);
    std::fill(w.m.begin(), w.m.begin() + nq, kNegInf);
    std::fill(w.l.begin(), w.l.begin() + nq, 0.0f);
  }

  // Folds in nk keys: kt [D, BK] transposed keys, v [nk, D] values. With `mask` set, w.qc / w.kc hold
  // the coordinates of a partial tile. Columns nk..BK of kt may hold anything finite or not: they are
  // replaced by -inf before the softmax and never reach the output.
  LLADA_CPU_INLINE void add(const float* kt, const float* v, int64_t nk, const AttentionMask* mask) {
    float* s = w.s.data();
    cpu::gemm<false>(nq, BK, D, w.q.data(), D, kt, BK, s, BK);  // [nq, BK] = Q K^T
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * BK;
      if (mask) cpu::mask_row(si, *mask, w.qc.block[i], w.qc.clean[i], w.kc, nk);
      for (int64_t j = nk; j < BK; ++j) si[j] = kNegInf;
      const float m_new = max_nan(w.m[i], cpu::max_row(si, nk));
      if (m_new == kNegInf) {  // nothing visible yet in this row
        std::fill(si, si + BK, 0.0f);
        continue;
      }
      const float alpha = exp_nonpositive(w.m[i] - m_new);
      const float alpha_or_zero = w.m[i] == kNegInf ? 0.0f : alpha;
      w.l[i] = w.l[i] * alpha_or_zero + cpu::exp_row(si, BK, m_new);
      w.m[i] = m_new;
      if (alpha_or_zero != 1.0f) {
        float* oi = w.o.data() + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) oi[d] *= alpha_or_zero;
      }
    }
    cpu::gemm<true>(nq, D, nk, s, BK, v, D, w.o.data(), D);  // O += P V
  }

  // out rows [nq, D] of `dtype` at out_row_stride; lse at lse_stride, by attention/softmax_rule.h (rows that
  // saw no key get 0, -inf).
  LLADA_CPU_INLINE void finish(char* out, int64_t out_row_stride, DType dtype, float* lse, int64_t lse_stride) {
    for (int64_t i = 0; i < nq; ++i) {
      float* oi = w.o.data() + i * D;
      const float inv = row_out_scale(w.m[i], w.l[i]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) oi[d] = row_out(oi[d], inv);
      cpu::store_row(out + static_cast<size_t>(i * out_row_stride) * cpu::dtype_bytes(dtype), oi, dtype, D);
      lse[i * lse_stride] = row_lse(w.m[i], std::log(w.l[i]));
    }
  }
};

LLADA_CPU_MULTIVERSION void forward_task(const BlockAttentionParams& p, const cpu::KvTiles& kv, FwdScratch& w, int64_t seq,
                                   int64_t q_tile, int64_t h) {
  const int64_t D = p.head_dim;
  const int64_t cq = p.cu_seqlens_q[seq], ck = p.cu_seqlens_k[seq];
  const DocMask dm{p.mask, p.block_size, p.cu_seqlens_q[seq + 1] - cq, p.cu_seqlens_k[seq + 1] - ck};
  const int64_t q0 = q_tile * BQ;
  const int64_t nq = std::min(BQ, dm.len_q - q0);
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const size_t esize = cpu::dtype_bytes(p.dtype);

  const cpu::Rows q{static_cast<const char*>(p.q) + static_cast<size_t>((cq + q0) * p.q_row_stride + h * p.q_head_stride) * esize,
                    p.q_row_stride, p.dtype};
  OnlineTile tile{w, nq, D};
  tile.begin(q, p.softmax_scale);
  cpu::query_coords(w.qc, dm, q0, nq);

  const RowRange keys = key_range(dm, q0, q0 + nq);
  for (int64_t k0 = (keys.begin / BK) * BK; k0 < keys.end; k0 += BK) {
    const int64_t nk = std::min(BK, dm.len_k - k0);
    const TileKind kind = classify_tile(dm, q0, q0 + nq, k0, k0 + nk);
    if (kind == TileKind::kSkip) continue;
    if (kind == TileKind::kPartial) cpu::key_coords(w.kc, dm, k0, nk);
    tile.add(kv.at(kv.kt, seq, k0, hk), kv.at(kv.v, seq, k0, hk), nk, kind == TileKind::kPartial ? &p.mask : nullptr);
  }
  char* out = static_cast<char*>(p.out) + static_cast<size_t>(((cq + q0) * p.heads_q + h) * D) * esize;
  tile.finish(out, p.heads_q * D, p.dtype, p.lse + (cq + q0) * p.heads_q + h, p.heads_q);
}

// Rows first.. of one kv head of a [*, Hkv, D] tensor: row j of `base`, or with `pages` (a sequence's page
// list) row j % page_size of page pages[j / page_size].
struct KvRows {
  const char* base;  // row 0 of the kv head
  int64_t row_stride;  // Hkv * D elements
  DType dtype;
  int64_t first;
  const int32_t* pages = nullptr;
  int64_t page_size = 1;

  LLADA_CPU_INLINE const void* row(int64_t r) const {
    int64_t j = first + r;
    if (pages != nullptr) j = pages[j / page_size] * page_size + j % page_size;
    return base + static_cast<size_t>(j * row_stride) * cpu::dtype_bytes(dtype);
  }
};

// Folds one key / value tile (nk rows of k and v) into the G query tiles of a GQA group; the tile is converted
// once into ws[0].kt / ws[0].v.
LLADA_CPU_INLINE void decode_add_tile(const BlockAttentionDecodeParams& p, std::vector<FwdScratch>& ws, int64_t nq,
                                      const KvRows& k, const KvRows& v, int64_t nk) {
  const int64_t D = p.head_dim;
  float* kt_tile = ws[0].kt.data();
  float* v_tile = ws[0].v.data();
  cpu::load_tile_transposed(kt_tile, BK, k, nk, D, 1.0f, ws[0].row.data());
  cpu::load_tile(v_tile, v, nk, nk, D, 1.0f);
  for (FwdScratch& w : ws) OnlineTile{w, nq, D}.add(kt_tile, v_tile, nk, nullptr);
}

// One task is (sequence, query tile, kv head): the G query heads of the group share every key tile. The cache
// rows are cut into the same key tiles whether the cache is contiguous or paged, so both give the same bits.
LLADA_CPU_MULTIVERSION void decode_task(const BlockAttentionDecodeParams& p, std::vector<FwdScratch>& ws, int64_t b,
                                  int64_t q_tile, int64_t hk) {
  const int64_t D = p.head_dim, Lb = p.block, Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int64_t q0 = q_tile * BQ;
  const int64_t nq = std::min(BQ, Lb - q0);
  const size_t esize = cpu::dtype_bytes(p.dtype);
  for (int64_t g = 0; g < G; ++g) {
    const char* q = static_cast<const char*>(p.q) + static_cast<size_t>(((b * Lb + q0) * Hq + hk * G + g) * D) * esize;
    OnlineTile{ws[g], nq, D}.begin(cpu::Rows{q, Hq * D, p.dtype}, p.softmax_scale);
  }
  const bool paged = p.block_table != nullptr;
  const int32_t* pages = paged ? p.block_table + b * p.max_pages : nullptr;
  const int64_t cache_first = paged ? 0 : b * p.cache_capacity;  // row of the sequence's row 0 in k_cache / v_cache
  const auto rows = [&](const void* base, int64_t first, const int32_t* page_list) {
    return KvRows{static_cast<const char*>(base) + static_cast<size_t>(hk * D) * esize, Hkv * D, p.dtype, first,
                  page_list, paged ? p.page_size : 1};
  };
  const int64_t cached = p.cache_seqlens[b];
  for (int64_t k0 = 0; k0 < cached; k0 += BK)
    decode_add_tile(p, ws, nq, rows(p.k_cache, cache_first + k0, pages), rows(p.v_cache, cache_first + k0, pages),
                    std::min(BK, cached - k0));
  for (int64_t k0 = 0; k0 < Lb; k0 += BK)
    decode_add_tile(p, ws, nq, rows(p.k_new, b * Lb + k0, nullptr), rows(p.v_new, b * Lb + k0, nullptr),
                    std::min(BK, Lb - k0));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    char* out = static_cast<char*>(p.out) + static_cast<size_t>(((b * Lb + q0) * Hq + h) * D) * esize;
    OnlineTile{ws[g], nq, D}.finish(out, Hq * D, p.dtype, p.lse + (b * Lb + q0) * Hq + h, Hq);
  }
}

}  // namespace

Status block_attention_fwd_cpu(const BlockAttentionParams& p) {
  if (p.dtype == DType::kFloat16 || p.block_size < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0)
    return Status::kBadArgument;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (sequence, query tile)
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t len_q = p.cu_seqlens_q[s + 1] - p.cu_seqlens_q[s];
    for (int64_t t = 0; t * BQ < len_q; ++t) tiles.emplace_back(s, t);
  }
  const cpu::KvTiles kv = cpu::make_kv_tiles(p, cpu::kKeysT | cpu::kValues);
  const int64_t tasks = static_cast<int64_t>(tiles.size()) * p.heads_q;
#pragma omp parallel if (tasks > 1)
  {
    FwdScratch w(p.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const auto& [s, t] = tiles[task / p.heads_q];
      forward_task(p, kv, w, s, t, task % p.heads_q);
    }
  }
  return Status::kOk;
}

Status block_attention_decode_cpu(const BlockAttentionDecodeParams& p) {
  if (p.dtype == DType::kFloat16 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) return Status::kBadArgument;
  if (p.block_table != nullptr && p.page_size < 1) return Status::kBadArgument;
  if (p.batch == 0 || p.block == 0 || p.heads_q == 0) return Status::kOk;  // empty out and lse
  const int64_t q_tiles = (p.block + BQ - 1) / BQ;
  const int64_t tasks = p.batch * q_tiles * p.heads_kv;
#pragma omp parallel if (tasks > 1)
  {
    std::vector<FwdScratch> ws(static_cast<size_t>(p.heads_q / p.heads_kv), FwdScratch(p.head_dim));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t hk = task % p.heads_kv, t = (task / p.heads_kv) % q_tiles, b = task / (p.heads_kv * q_tiles);
      decode_task(p, ws, b, t, hk);
    }
  }
  return Status::kOk;
}

}  // namespace llada
