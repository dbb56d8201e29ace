// Parallel token commit (docs/ARCHITECTURE.md, Token commit): the torch-free interface of the `commit_tokens` ops.
//
// One call looks at the current block of every sequence in a batch: for each position it proposes a
// token x0 from the logits (greedy, or sampled after temperature / top-k / top-p) with its
// confidence, then commits, per sequence, every masked position whose confidence exceeds the
// threshold, or the `min_commit[b]` most confident masked positions when fewer pass.
//
// Shapes: B sequences, L positions in the block, V vocabulary.
#pragma once

#include <cstdint>

#include "llada/dtype.h"
#include "llada/status.h"

#ifdef LLADA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace llada {

struct CommitTokensParams {
  int64_t* tokens = nullptr;            // [B, L] in/out; positions equal to mask_id are undecided
  const void* logits = nullptr;         // [B, L, V] contiguous, of logits_dtype
  DType logits_dtype = DType::kFloat32;
  const int32_t* min_commit = nullptr;  // [B]
  bool* committed = nullptr;            // [B, L] out: position committed by this call
  float* confidence = nullptr;          // [B, L] out: confidence of x0, -inf where not masked
  int64_t* candidates = nullptr;        // [B, L] out: proposed token x0 at every position

  int64_t batch = 0;                    // B
  int64_t block = 0;                    // L
  int64_t vocab = 0;                    // V
  int64_t mask_id = 0;
  float threshold = 0.95f;
  float temperature = 0.0f;             // 0: greedy
  int64_t top_k = 0;                    // 0: off
  float top_p = 1.0f;                   // 1: off
  uint64_t seed = 0;                    // Philox key
  uint64_t offset = 0;                  // Philox counter offset
  void* workspace = nullptr;            // CUDA only: commit_tokens_cuda_workspace_bytes(p) bytes of device memory

  // Per-sequence parameters, [B] each (host memory for the CPU kernel, device for CUDA); nullptr: the scalar
  // above for every sequence. Values are taken as they are: a top_k <= 0 or >= V is off, a top_p >= 1 is off.
  struct PerSequence {
    const float* threshold = nullptr;
    const float* temperature = nullptr;
    const int32_t* top_k = nullptr;
    const float* top_p = nullptr;
    const int64_t* seed = nullptr;
    const int64_t* offset = nullptr;
  } per_seq;
  // Philox counter of position l of sequence b: false, b * L + l (one stream over the batch); true, l (each
  // sequence its own stream of (seed, offset), so that its draws do not depend on its place in the batch).
  bool own_streams = false;
  // [B] out, or nullptr. Set: invalid[b] = some position of sequence b has logits with a NaN or no finite
  // maximum (zeroed by the caller); such a position proposes token 0 with confidence NaN where masked and is
  // never committed, the others commit as usual, and the kernels do not fail. Unset: the CPU kernel returns
  // kNanInput (tokens untouched) and CUDA marks the position as above.
  bool* invalid = nullptr;
};

// C++ CPU kernel (OpenMP over rows). Without p.invalid, returns kNanInput if a row of logits holds a NaN; the
// outputs are then unspecified and `tokens` is left unchanged.
Status commit_tokens_cpu(const CommitTokensParams& p);

#ifdef LLADA_WITH_CUDA
// CUDA kernels, asynchronous on `stream`, no host synchronisation, capturable in a CUDA graph.
// A row of logits holding a NaN gets a NaN confidence at its masked positions and is never committed (and
// flags its sequence in p.invalid).
// p.workspace must hold commit_tokens_cuda_workspace_bytes(p) bytes (null when that is 0).
Status commit_tokens_cuda(const CommitTokensParams& p, cudaStream_t stream);
int64_t commit_tokens_cuda_workspace_bytes(const CommitTokensParams& p);
#endif

}  // namespace llada
