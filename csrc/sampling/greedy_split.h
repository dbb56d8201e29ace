// How the CUDA greedy proposal splits each row of logits across thread blocks, shared by the kernels
// and the host (which sizes the workspace of partial states). Few rows (a batch of one block is 32
// rows) would leave most multiprocessors idle and each block with a long serial stream, so a row is cut
// into up to kMaxGreedySplits chunks of at least kMinGreedyChunk entries until about kGreedyTargetBlocks
// blocks run; the commit kernel merges the chunks' partial softmax states.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace llada {

constexpr int64_t kGreedyTargetBlocks = 512;
constexpr int64_t kMaxGreedySplits = 16;
constexpr int64_t kMinGreedyChunk = 4096;
constexpr int64_t kGreedyChunkAlign = 64;  // entries: keeps every chunk start 16-byte aligned when the row is

LLADA_HD int64_t greedy_splits(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab <= 0) return 1;
  int64_t splits = (kGreedyTargetBlocks + rows - 1) / rows;
  if (splits > kMaxGreedySplits) splits = kMaxGreedySplits;
  const int64_t by_size = vocab / kMinGreedyChunk;
  if (splits > by_size) splits = by_size;
  return splits < 1 ? 1 : splits;
}

// Entries per chunk (the last chunk may be shorter, never empty).
LLADA_HD int64_t greedy_chunk(int64_t vocab, int64_t splits) {
  const int64_t even = (vocab + splits - 1) / splits;
  return (even + kGreedyChunkAlign - 1) / kGreedyChunkAlign * kGreedyChunkAlign;
}

}  // namespace llada
