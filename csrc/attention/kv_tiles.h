// Keys and values of a packed varlen batch converted once to fp32 tiles of BK rows (zero-padded at
// the end of each sequence), in the layouts the CPU kernels multiply with, so that every query tile
// and every query head of a GQA group reads them without converting or transposing again.
#pragma once

#include <cstdint>
#include <vector>

#include "attention/cpu_tile.h"
#include "llada/attention.h"

namespace llada {
namespace cpu {

enum KvTileParts : unsigned {
  kKeysT = 1u,    // [D, BK] keys, transposed
  kKeys = 2u,     // [BK, D]
  kValues = 4u,   // [BK, D]
  kValuesT = 8u,  // [D, BK] values, transposed
};

struct KvTiles {
  std::vector<int64_t> first;  // [S + 1] index of each sequence's first key tile
  int64_t heads = 0;           // Hkv
  int64_t tile_size = 0;       // BK * D floats
  std::vector<float> kt, k, v, vt;  // [tiles, Hkv, tile_size] each, empty unless requested

  // The tile of keys [k0, k0 + BK) of sequence `seq` (k0 a multiple of BK), kv head hk, in part `a`.
  const float* at(const std::vector<float>& a, int64_t seq, int64_t k0, int64_t hk) const {
    return a.data() + static_cast<size_t>(((first[seq] + k0 / BK) * heads + hk) * tile_size);
  }
};

// Converts the requested parts (OpenMP over tiles x kv heads).
KvTiles make_kv_tiles(const BlockAttentionParams& p, unsigned parts);

}  // namespace cpu
}  // namespace llada
