// The `llada` operator library: every schema, defined once. Implementations are registered per
// device by the family files beside this one (sampling.cpp, ...). Argument names equal the Python
// wrappers' names in llada_engine/ops/.
#include <torch/library.h>

TORCH_LIBRARY(llada, m) {
  // Proposes a token x0 and its confidence at every position of the current block, then commits,
  // per sequence, the masked positions above `threshold` (or the `min_commit` most confident).
  m.def(
      "commit_tokens(Tensor tokens, Tensor logits, Tensor min_commit, *, int mask_id, float threshold, "
      "float temperature, int top_k, float top_p, int seed, int offset) "
      "-> (Tensor tokens, Tensor committed, Tensor confidence, Tensor candidates)");
  // Same as commit_tokens, writing the commits into `tokens` in place.
  m.def(
      "commit_tokens_(Tensor(a!) tokens, Tensor logits, Tensor min_commit, *, int mask_id, float threshold, "
      "float temperature, int top_k, float top_p, int seed, int offset) "
      "-> (Tensor committed, Tensor confidence, Tensor candidates)");
}
