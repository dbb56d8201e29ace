// Builds the fp32 key/value tiles of attention/kv_tiles.h from the strided bf16 or fp32 inputs.
#include <omp.h>

#include <algorithm>

#include "attention/kv_tiles.h"

namespace llada {
namespace cpu {
namespace {

LLADA_CPU_MULTIVERSION void convert_tile(const BlockAttentionParams& p, KvTiles& kv, unsigned parts, int64_t seq,
                                   int64_t tile, int64_t hk, float* row) {
  const int64_t D = p.head_dim;
  const int64_t ck = p.cu_seqlens_k[seq];
  const int64_t k0 = (tile - kv.first[seq]) * BK;
  const int64_t nk = std::min(BK, p.cu_seqlens_k[seq + 1] - ck - k0);
  const size_t esize = dtype_bytes(p.dtype);
  const Rows k{static_cast<const char*>(p.k) + static_cast<size_t>((ck + k0) * p.k_row_stride + hk * p.k_head_stride) * esize,
               p.k_row_stride, p.dtype};
  const Rows v{static_cast<const char*>(p.v) + static_cast<size_t>((ck + k0) * p.v_row_stride + hk * p.v_head_stride) * esize,
               p.v_row_stride, p.dtype};
  const size_t offset = static_cast<size_t>((tile * kv.heads + hk) * kv.tile_size);
  if (parts & kKeysT) load_tile_transposed(kv.kt.data() + offset, BK, k, nk, D, 1.0f, row);
  if (parts & kKeys) load_tile(kv.k.data() + offset, k, nk, BK, D, 1.0f);
  if (parts & kValues) load_tile(kv.v.data() + offset, v, nk, BK, D, 1.0f);
  if (parts & kValuesT) load_tile_transposed(kv.vt.data() + offset, BK, v, nk, D, 1.0f, row);
}

}  // namespace

KvTiles make_kv_tiles(const BlockAttentionParams& p, unsigned parts) {
  KvTiles kv;
  kv.heads = p.heads_kv;
  kv.tile_size = BK * p.head_dim;
  kv.first.assign(p.num_seqs + 1, 0);
  std::vector<int64_t> tile_seq;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t tiles = (p.cu_seqlens_k[s + 1] - p.cu_seqlens_k[s] + BK - 1) / BK;
    kv.first[s + 1] = kv.first[s] + tiles;
    tile_seq.insert(tile_seq.end(), tiles, s);
  }
  const int64_t tasks = kv.first[p.num_seqs] * p.heads_kv;
  const size_t size = static_cast<size_t>(tasks * kv.tile_size);
  if (parts & kKeysT) kv.kt.resize(size);
  if (parts & kKeys) kv.k.resize(size);
  if (parts & kValues) kv.v.resize(size);
  if (parts & kValuesT) kv.vt.resize(size);
#pragma omp parallel if (tasks > 1)
  {
    std::vector<float> row(p.head_dim);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task)
      convert_tile(p, kv, parts, tile_seq[task / p.heads_kv], task / p.heads_kv, task % p.heads_kv, row.data());
  }
  return kv;
}

}  // namespace cpu
}  // namespace llada
