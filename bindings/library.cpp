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
  // commit_tokens with one threshold, temperature, top_k, top_p, seed and offset per sequence ([B] tensors
  // on the tokens' device or the CPU): sequence b behaves as the call on sequence b alone. own_streams: the
  // Philox counter of position l of sequence b is l (its own stream), else b * L + l (one stream, as
  // commit_tokens). Never fails on NaN logits: invalid [B] flags the sequences whose logits held one.
  m.def(
      "commit_tokens_per_seq(Tensor tokens, Tensor logits, Tensor min_commit, Tensor threshold, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, *, int mask_id, "
      "bool own_streams=True) -> (Tensor tokens, Tensor committed, Tensor confidence, Tensor candidates, "
      "Tensor invalid)");
  // Same as commit_tokens_per_seq, writing the commits into `tokens` in place.
  m.def(
      "commit_tokens_per_seq_(Tensor(a!) tokens, Tensor logits, Tensor min_commit, Tensor threshold, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, *, int mask_id, "
      "bool own_streams=True) -> (Tensor committed, Tensor confidence, Tensor candidates, Tensor invalid)");
  // LLaDA2 gate: sigmoid scores, group-limited top-k on scores + expert_bias, normalised unbiased weights.
  m.def(
      "moe_route(Tensor router_logits, Tensor? expert_bias, *, int top_k, int n_group, int topk_group, "
      "float routed_scaling_factor, bool norm_topk_prob=True) -> (Tensor topk_ids, Tensor topk_weights)");
  // Copies the rows of x into expert order (stable in token, slot): x_sorted, offsets [E + 1], inverse [T * k].
  m.def("moe_permute(Tensor x, Tensor topk_ids, int num_experts) -> (Tensor x_sorted, Tensor offsets, Tensor inverse)");
  // out[t] = sum_s topk_weights[t, s] * y[inverse[t * k + s]].
  m.def("moe_unpermute(Tensor y, Tensor inverse, Tensor topk_weights) -> Tensor");
  // Backward of moe_unpermute: the gradients of y and of topk_weights.
  m.def(
      "moe_unpermute_backward(Tensor grad_out, Tensor y, Tensor inverse, Tensor topk_weights) "
      "-> (Tensor grad_y, Tensor grad_topk_weights)");
  // out[rows of g] = a[rows of g] @ b[g]^T, rows of g = offsets[g]:offsets[g + 1]; b [E, N, K].
  m.def("moe_grouped_gemm(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  // Weight gradient of moe_grouped_gemm: grad_b[g] = grad_out[rows of g]^T @ a[rows of g], [E, N, K].
  m.def("moe_grouped_gemm_wgrad(Tensor grad_out, Tensor a, Tensor offsets) -> Tensor");
  // Block attention over packed varlen documents (docs/ARCHITECTURE.md, Block attention), mask "block_causal" or "bd3":
  // the output [Tq, Hq, D] and the fp32 log-sum-exp of the scaled masked scores [Tq, Hq].
  // kernel (CUDA): "auto", "flash2" (FlashAttention-2 style, sm_80+) or "hopper" (wgmma + TMA, sm_90a).
  m.def(
      "block_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, *, int block_size, str mask, float softmax_scale, "
      "str kernel=\"auto\") -> (Tensor out, Tensor lse)");
  // Gradients dq, dk, dv of block_attention_fwd from dout (and dlse when the lse output is used); kernel as there.
  m.def(
      "block_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, *, int block_size, "
      "str mask, float softmax_scale, str kernel=\"auto\") -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decoding: the current block's queries [B, Lb, Hq, D] against the first cache_seqlens[b] rows of a
  // contiguous per-sequence cache [B, Smax, Hkv, D] plus the block's own keys, no mask inside the block.
  // cache_seqlens int32 [B] on q's device, or on the CPU (validated there, no device synchronisation).
  // With block_table (int32 [B, max_pages], on q's device or the CPU) the caches are page pools
  // [num_pages, page_size, Hkv, D]: cached row r of sequence b is row r % page_size of page block_table[b, r // page_size].
  m.def(
      "block_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor k_new, "
      "Tensor v_new, *, float softmax_scale, Tensor? block_table=None) -> (Tensor out, Tensor lse)");
}
