// The split of a greedy row across CUDA thread blocks: the chunks tile [0, V) exactly, none is empty,
// each starts on the alignment grain, and the count follows the vocabulary alone.
#include <cstdint>
#include <initializer_list>

#include "check.h"
#include "sampling/greedy_split.h"

int main() {
  for (int64_t vocab : {1, 63, 4095, 4096, 8193, 32000, 157184, 200003}) {
    const int64_t splits = llada::greedy_splits(vocab);
    CHECK(splits >= 1 && splits <= llada::kMaxGreedySplits);
    CHECK(splits == 1 || vocab / splits >= llada::kMinGreedyChunk);
    const int64_t chunk = llada::greedy_chunk(vocab, splits);
    CHECK(chunk % llada::kGreedyChunkAlign == 0);
    CHECK(chunk * splits >= vocab);           // the chunks cover the row
    CHECK(chunk * (splits - 1) < vocab);      // and the last one is not empty
  }
  CHECK(llada::greedy_splits(157184) == 16);   // the LLaDA2.0 vocabulary: 16 chunks of 9856
  CHECK(llada::greedy_chunk(157184, 16) == 9856);
  CHECK(llada::greedy_splits(8192) == 2);      // a small vocabulary is not cut below kMinGreedyChunk
  CHECK(llada::greedy_splits(4095) == 1);
  TEST_MAIN_END();
}
