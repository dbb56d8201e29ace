// The block-attention mask (csrc/attention/block_mask.h): the predicate against the rule of
// (docs/ARCHITECTURE.md, Block attention) written out independently; the tile classification, the key/query
// ranges, the per-row kept key ranges and the 32-bit coordinates against it, for many lengths, block sizes and
// tile shapes.
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "attention/block_mask.h"
#include "check.h"

using llada::AttentionMask;
using llada::DocMask;
using llada::TileKind;

// The rule as the design states it, from positions.
static bool rule(const DocMask& m, int64_t i, int64_t j) {
  const int64_t bs = m.block_size;
  if (m.kind == AttentionMask::kBlockCausal) {
    const int64_t q_pos = i + m.len_k - m.len_q;
    if (q_pos < 0) return false;
    return j / bs <= q_pos / bs;
  }
  const int64_t n = m.len_q / 2;
  const bool q_noisy = i < n, k_noisy = j < n;
  const int64_t bq = (i % n) / bs, bk = (j % n) / bs;
  if (q_noisy) return k_noisy ? bk == bq : bk < bq;
  return !k_noisy && bk <= bq;
}

static int64_t checked_tiles = 0;
static int64_t kinds_seen[3] = {0, 0, 0};

static void check_doc(const DocMask& m, int64_t tq, int64_t tk) {
  if (llada_test::failures() >= 10) return;
  for (int64_t i = 0; i < m.len_q; ++i)
    for (int64_t j = 0; j < m.len_k; ++j) {
      if (llada::mask_keep(m, i, j) != rule(m, i, j)) {
        std::fprintf(stderr, "mask kind %d bs %lld lq %lld lk %lld at (%lld, %lld)\n", static_cast<int>(m.kind),
                     (long long)m.block_size, (long long)m.len_q, (long long)m.len_k, (long long)i, (long long)j);
        CHECK(false);
        return;
      }
    }
  const int bs32 = llada::block_size32(m.block_size);
  for (int64_t i = 0; i < m.len_q; ++i) {
    const llada::MaskCoord32 qc =
        llada::query_coord32(m.kind, static_cast<int>(i), static_cast<int>(m.len_q), static_cast<int>(m.len_k), bs32);
    for (int64_t j = 0; j < m.len_k; ++j) {
      const llada::MaskCoord32 kc = llada::key_coord32(m.kind, static_cast<int>(j), static_cast<int>(m.len_k), bs32);
      if (llada::keep32(m.kind, qc, kc) != rule(m, i, j)) {
        std::fprintf(stderr, "keep32 kind %d bs %lld lq %lld lk %lld at (%lld, %lld)\n", static_cast<int>(m.kind),
                     (long long)m.block_size, (long long)m.len_q, (long long)m.len_k, (long long)i, (long long)j);
        CHECK(false);
        return;
      }
    }
  }
  for (int64_t i = 0; i < m.len_q; ++i) {
    const llada::KeptKeys kk = llada::kept_keys(m, i);
    for (int64_t j = 0; j < m.len_k; ++j) {
      const bool in = (j >= kk.a.begin && j < kk.a.end) || (j >= kk.b.begin && j < kk.b.end);
      if (in != rule(m, i, j)) {
        std::fprintf(stderr, "kept_keys kind %d bs %lld lq %lld lk %lld at (%lld, %lld)\n", static_cast<int>(m.kind),
                     (long long)m.block_size, (long long)m.len_q, (long long)m.len_k, (long long)i, (long long)j);
        CHECK(false);
        return;
      }
    }
    CHECK(kk.a.end <= m.len_k && kk.b.end <= m.len_k);
  }
  for (int64_t q0 = 0; q0 < m.len_q; q0 += tq) {
    const int64_t q1 = q0 + tq < m.len_q ? q0 + tq : m.len_q;
    const llada::RowRange keys = llada::key_range(m, q0, q1);
    for (int64_t k0 = 0; k0 < m.len_k; k0 += tk) {
      const int64_t k1 = k0 + tk < m.len_k ? k0 + tk : m.len_k;
      int64_t kept = 0;
      bool outside = false;
      for (int64_t i = q0; i < q1; ++i)
        for (int64_t j = k0; j < k1; ++j) {
          const bool keep = rule(m, i, j);
          kept += keep;
          if (keep && (j < keys.begin || j >= keys.end)) outside = true;
          if (keep) {
            const llada::RowRange rows = llada::query_range(m, k0, k1);
            if (i < rows.begin || i >= rows.end) outside = true;
          }
        }
      const int64_t total = (q1 - q0) * (k1 - k0);
      const TileKind expect = kept == 0 ? TileKind::kSkip : (kept == total ? TileKind::kFull : TileKind::kPartial);
      const TileKind got = llada::classify_tile(m, q0, q0 + tq, k0, k0 + tk);
      if (got != expect || outside) {
        std::fprintf(stderr, "tile kind %d bs %lld lq %lld lk %lld tile [%lld,%lld)x[%lld,%lld): got %d want %d%s\n",
                     static_cast<int>(m.kind), (long long)m.block_size, (long long)m.len_q, (long long)m.len_k,
                     (long long)q0, (long long)q1, (long long)k0, (long long)k1, static_cast<int>(got),
                     static_cast<int>(expect), outside ? ", kept pair outside the ranges" : "");
        CHECK(false);
        return;
      }
      ++checked_tiles;
      ++kinds_seen[static_cast<int>(got)];
    }
  }
}

int main() {
  const int64_t block_sizes[] = {1, 2, 3, 4, 5, 8, 16, 32, 33, 64, 1000, int64_t{1} << 40};
  const int64_t tiles[][2] = {{1, 1}, {4, 4}, {16, 16}, {16, 64}, {64, 16}, {64, 64}, {7, 5}, {128, 64}};
  const int64_t lengths[] = {1, 2, 3, 7, 32, 33, 64, 65, 100, 130};
  for (int64_t bs : block_sizes)
    for (const auto& t : tiles) {
      for (int64_t lq : lengths)
        for (int64_t lk : lengths) check_doc({AttentionMask::kBlockCausal, bs, lq, lk}, t[0], t[1]);
      for (int64_t len : lengths)
        for (int64_t twice : {2 * len, len + (len % 2)})
          check_doc({AttentionMask::kBd3, bs, twice, twice}, t[0], t[1]);
    }
  // Empty documents and tiles past the end are skipped.
  CHECK(llada::classify_tile({AttentionMask::kBlockCausal, 4, 0, 0}, 0, 64, 0, 64) == TileKind::kSkip);
  CHECK(llada::classify_tile({AttentionMask::kBd3, 4, 8, 8}, 8, 16, 0, 8) == TileKind::kSkip);
  // A hand-checked bd3 pattern: n = 4, block size 2; rows are queries, columns keys.
  const char* expect[8] = {"11000000", "11000000", "00111100", "00111100",
                           "00001100", "00001100", "00001111", "00001111"};
  const DocMask bd3{AttentionMask::kBd3, 2, 8, 8};
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) CHECK(llada::mask_keep(bd3, i, j) == (expect[i][j] == '1'));
  CHECK(kinds_seen[0] > 0 && kinds_seen[1] > 0 && kinds_seen[2] > 0);
  std::printf("%lld tiles checked (skip %lld, partial %lld, full %lld)\n", (long long)checked_tiles,
              (long long)kinds_seen[0], (long long)kinds_seen[1], (long long)kinds_seen[2]);
  TEST_MAIN_END();
}
