// The block-attention mask (docs/ARCHITECTURE.md, Block attention), its tile classification, shared by the CPU and CUDA
// kernels (LLADA_HD) and unit-tested against the element-wise predicate in tests/cpp/test_block_mask.cpp.
//
// Within one document, query row i in [0, len_q) and key row j in [0, len_k) get a coordinate
// (half, block): the mask is a comparison of the two coordinates.
//   block_causal: half 0; q block = floor((i + len_k - len_q) / bs), k block = j / bs; keep iff kb <= qb.
//   bd3:          n = len_q / 2, half = (row >= n), block = (row mod n) / bs;
//                 noisy q: keep iff (noisy k and kb == qb) or (clean k and kb < qb);
//                 clean q: keep iff clean k and kb <= qb.
// A tile (a rectangle of rows x keys) is classified exactly in O(1): per pair of halves the relation
// is ==, <, <= or never over block indices, and blocks are monotone in the row.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "llada/attention.h"

namespace llada {

enum class TileKind : int {
  kSkip = 0,     // the mask removes every pair: never computed
  kPartial = 1,  // some pairs kept: the mask is evaluated per element
  kFull = 2,     // every pair kept: computed without a mask
};

struct DocMask {
  AttentionMask kind = AttentionMask::kBlockCausal;
  int64_t block_size = 1;
  int64_t len_q = 0;
  int64_t len_k = 0;
};

struct MaskCoord {
  int64_t block = 0;
  bool clean = false;  // bd3: row in the x_0 half
};

struct RowRange {
  int64_t begin = 0;
  int64_t end = 0;  // exclusive; begin >= end is empty
};

LLADA_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

LLADA_HD int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
LLADA_HD int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

LLADA_HD MaskCoord query_coord(const DocMask& m, int64_t i) {
  MaskCoord c;
  if (m.kind == AttentionMask::kBlockCausal) {
    c.block = floor_div(i + m.len_k - m.len_q, m.block_size);
  } else {
    const int64_t n = m.len_q / 2;
    c.clean = i >= n;
    c.block = (c.clean ? i - n : i) / m.block_size;
  }
  return c;
}

LLADA_HD MaskCoord key_coord(const DocMask& m, int64_t j) {
  MaskCoord c;
  if (m.kind == AttentionMask::kBlockCausal) {
    c.block = j / m.block_size;
  } else {
    const int64_t n = m.len_k / 2;
    c.clean = j >= n;
    c.block = (c.clean ? j - n : j) / m.block_size;
  }
  return c;
}

LLADA_HD bool coords_keep(AttentionMask kind, MaskCoord q, MaskCoord k) {
  if (kind == AttentionMask::kBlockCausal) return k.block <= q.block;
  if (q.clean) return k.clean && k.block <= q.block;
  return k.clean ? k.block < q.block : k.block == q.block;
}

LLADA_HD bool mask_keep(const DocMask& m, int64_t i, int64_t j) {
  return coords_keep(m.kind, query_coord(m, i), key_coord(m, j));
}

// The same coordinates in 32-bit arithmetic, for kernels that evaluate the mask per element (a document has
// fewer than 2^31 rows; block sizes above INT32_MAX act as INT32_MAX). keep32(query_coord32(..), key_coord32(..))
// equals mask_keep.
struct MaskCoord32 {
  int block = 0;
  bool clean = false;
};

LLADA_HD int block_size32(int64_t block_size) { return static_cast<int>(min_i64(block_size, 0x7fffffff)); }

LLADA_HD MaskCoord32 query_coord32(AttentionMask kind, int i, int len_q, int len_k, int bs) {
  if (kind == AttentionMask::kBlockCausal) {
    const int pos = i + len_k - len_q;  // negative only for queries before the first key (len_q > len_k)
    return MaskCoord32{pos >= 0 ? pos / bs : static_cast<int>(-((static_cast<int64_t>(bs) - 1 - pos) / bs)), false};
  }
  const int n = len_q / 2;
  return MaskCoord32{(i >= n ? i - n : i) / bs, i >= n};
}

LLADA_HD MaskCoord32 key_coord32(AttentionMask kind, int j, int len_k, int bs) {
  if (kind == AttentionMask::kBlockCausal) return MaskCoord32{j / bs, false};
  const int n = len_k / 2;
  return MaskCoord32{(j >= n ? j - n : j) / bs, j >= n};
}

LLADA_HD bool keep32(AttentionMask kind, MaskCoord32 q, MaskCoord32 k) {
  if (kind == AttentionMask::kBlockCausal) return k.block <= q.block;
  if (q.clean) return k.clean && k.block <= q.block;
  return k.clean ? k.block < q.block : k.block == q.block;
}

// The keys query row i sees: the kept keys of one row are at most two ranges of key rows.
//   block_causal: [0, end of the row's block); bd3 clean row: the clean keys up to the end of its block;
//   bd3 noisy row: its own noisy block, and the clean keys of strictly earlier blocks.
// Clipped to [0, len_k); a kernel keeps key j of row i iff j lies in `a` or in `b`.
struct KeptKeys {
  RowRange a, b;
};

LLADA_HD KeptKeys kept_keys(const DocMask& m, int64_t i) {
  KeptKeys r;
  const MaskCoord c = query_coord(m, i);
  const int64_t bs = m.block_size;
  if (m.kind == AttentionMask::kBlockCausal) {
    r.a.end = c.block < 0 ? 0 : min_i64((c.block + 1) * bs, m.len_k);
    return r;
  }
  const int64_t n = m.len_k / 2;
  if (c.clean) {
    r.a = RowRange{n, n + min_i64((c.block + 1) * bs, n)};
  } else {
    r.a = RowRange{c.block * bs, min_i64((c.block + 1) * bs, n)};
    r.b = RowRange{n, n + c.block * bs};
  }
  return r;
}

namespace detail {

enum class BlockRelation : int { kNever, kEqual, kLess, kLessEqual };

// Whether some / every (qb, kb) with qb in [qa, qz], kb in [ka, kz] satisfies the relation.
struct AnyAll {
  bool any = false;
  bool all = true;
};

LLADA_HD AnyAll relation_any_all(BlockRelation r, int64_t qa, int64_t qz, int64_t ka, int64_t kz) {
  AnyAll a;
  switch (r) {
    case BlockRelation::kNever: a.any = false; a.all = false; break;
    case BlockRelation::kEqual: a.any = !(kz < qa || ka > qz); a.all = qa == qz && ka == kz && qa == ka; break;
    case BlockRelation::kLess: a.any = ka < qz; a.all = kz < qa; break;
    case BlockRelation::kLessEqual: a.any = ka <= qz; a.all = kz <= qa; break;
  }
  return a;
}

// Folds a sub-rectangle (rows [q0, q1) of one query half, keys [k0, k1) of one key half, both in
// positions local to their half) into the tile's any/all.
LLADA_HD void fold_rect(AnyAll& acc, BlockRelation r, int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                        int64_t bs) {
  if (q0 >= q1 || k0 >= k1) return;
  const AnyAll a = relation_any_all(r, floor_div(q0, bs), floor_div(q1 - 1, bs), k0 / bs, (k1 - 1) / bs);
  acc.any = acc.any || a.any;
  acc.all = acc.all && a.all;
}

}  // namespace detail

// Classifies the tile of query rows [q0, q1) x key rows [k0, k1) (clipped to the document).
LLADA_HD TileKind classify_tile(const DocMask& m, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  using detail::BlockRelation;
  q0 = max_i64(q0, 0);
  k0 = max_i64(k0, 0);
  q1 = min_i64(q1, m.len_q);
  k1 = min_i64(k1, m.len_k);
  if (q0 >= q1 || k0 >= k1) return TileKind::kSkip;
  detail::AnyAll acc;
  const int64_t bs = m.block_size;
  if (m.kind == AttentionMask::kBlockCausal) {
    const int64_t off = m.len_k - m.len_q;
    detail::fold_rect(acc, BlockRelation::kLessEqual, q0 + off, q1 + off, k0, k1, bs);
  } else {
    const int64_t n = m.len_q / 2;
    // Query halves and key halves in local positions: noisy [0, n), clean [n, 2n) shifted by n.
    const int64_t qn0 = q0, qn1 = min_i64(q1, n), qc0 = max_i64(q0, n) - n, qc1 = q1 - n;
    const int64_t kn0 = k0, kn1 = min_i64(k1, n), kc0 = max_i64(k0, n) - n, kc1 = k1 - n;
    detail::fold_rect(acc, BlockRelation::kEqual, qn0, qn1, kn0, kn1, bs);
    detail::fold_rect(acc, BlockRelation::kLess, qn0, qn1, kc0, kc1, bs);
    detail::fold_rect(acc, BlockRelation::kNever, qc0, qc1, kn0, kn1, bs);
    detail::fold_rect(acc, BlockRelation::kLessEqual, qc0, qc1, kc0, kc1, bs);
  }
  if (!acc.any) return TileKind::kSkip;
  return acc.all ? TileKind::kFull : TileKind::kPartial;
}

// Keys that query rows [q0, q1) may see: every kept (i, j) with i in the rows has j in the range.
// A bound for the loop over key tiles; classify_tile decides each tile inside it.
LLADA_HD RowRange key_range(const DocMask& m, int64_t q0, int64_t q1) {
  RowRange r;
  q0 = max_i64(q0, 0);
  q1 = min_i64(q1, m.len_q);
  if (q0 >= q1 || m.len_k == 0) return r;
  const int64_t bs = m.block_size;
  if (m.kind == AttentionMask::kBlockCausal) {
    const int64_t last_block = floor_div(q1 - 1 + m.len_k - m.len_q, bs);
    r.end = min_i64(m.len_k, max_i64((last_block + 1) * bs, 0));
    return r;
  }
  const int64_t n = m.len_q / 2;
  r.begin = n;
  r.end = 0;
  if (q0 < n) {  // noisy rows: their own noisy blocks, clean keys of strictly earlier blocks
    const int64_t last_block = (min_i64(q1, n) - 1) / bs;
    r.begin = (q0 / bs) * bs;
    r.end = max_i64(n + last_block * bs, min_i64((last_block + 1) * bs, n));
  }
  if (q1 > n) {  // clean rows: clean keys up to the end of their own block
    r.end = max_i64(r.end, n + min_i64(((q1 - 1 - n) / bs + 1) * bs, n));
  }
  return r;
}

// Query rows that may see keys [k0, k1): every kept (i, j) with j in the keys has i in the range.
LLADA_HD RowRange query_range(const DocMask& m, int64_t k0, int64_t k1) {
  RowRange r;
  k0 = max_i64(k0, 0);
  k1 = min_i64(k1, m.len_k);
  if (k0 >= k1 || m.len_q == 0) return r;
  const int64_t bs = m.block_size;
  r.end = m.len_q;
  if (m.kind == AttentionMask::kBlockCausal) {
    r.begin = min_i64(max_i64((k0 / bs) * bs - (m.len_k - m.len_q), 0), m.len_q);
    return r;
  }
  const int64_t n = m.len_k / 2;
  r.begin = m.len_q;
  r.end = 0;
  if (k0 < n) {  // noisy keys: noisy rows of their own blocks only
    r.begin = (k0 / bs) * bs;
    r.end = min_i64(((min_i64(k1, n) - 1) / bs + 1) * bs, n);
  }
  if (k1 > n) {  // clean keys: noisy rows of later blocks, clean rows of the same and later blocks
    r.begin = min_i64(r.begin, min_i64(((max_i64(k0, n) - n) / bs + 1) * bs, n));
    r.end = m.len_q;
  }
  return r;
}

}  // namespace llada
