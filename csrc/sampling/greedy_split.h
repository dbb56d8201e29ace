// How the CUDA greedy proposal splits each row of logits across thread blocks, shared by the kernels
// and the host (which sizes the workspace of partial states). A whole row per block would leave a batch of
// one block (32 rows) with most multiprocessors idle and each block with a long serial stream, so a row is
// cut into up to kMaxGreedySplits chunks of at least kMinGreedyChunk entries; the commit kernel merges the
// chunks' partial softmax states. The cut depends on the vocabulary alone, never on the number of rows: the
// merge order fixes the rounding of the confidence, so a row gets the same bits in any batch.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace llada {

constexpr int64_t kMaxGreedySplits = 16;
constexpr int64_t kMinGreedyChunk = 4096;
constexpr int64_t kGreedyChunkAlign = 64;  // entries: keeps every chunk start 16-byte aligned when the row is

LLADA_HD int64_t greedy_splits(int64_t vocab) {
  const int64_t splits = vocab / kMinGreedyChunk;
  return splits < 1 ? 1 : (splits > kMaxGreedySplits ? kMaxGreedySplits : splits);
}

// Entries per chunk (the last chunk may be shorter, never empty).
LLADA_HD int64_t greedy_chunk(int64_t vocab, int64_t splits) {
  const int64_t even = (vocab + splits - 1) / splits;
  return (even + kGreedyChunkAlign - 1) / kGreedyChunkAlign * kGreedyChunkAlign;
}

}  // namespace llada
