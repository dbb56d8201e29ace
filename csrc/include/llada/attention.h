// Varlen document-masked block attention (docs/ARCHITECTURE.md, Block attention): the torch-free interface of the
// `block_attention` op family.
//
// Packed layout without padding: sequence s owns query rows cu_seqlens_q[s]..cu_seqlens_q[s+1] and key
// rows cu_seqlens_k[s]..cu_seqlens_k[s+1]; nothing attends across sequences. Hq query heads share
// Hkv key/value heads (GQA: query head h reads key head h / (Hq / Hkv)). Rows are strided, the head
// dimension D is contiguous. Softmax statistics and every accumulation are fp32.
//
// Shapes: Tq/Tk packed tokens, S sequences, Hq/Hkv heads, D head dim, B batch, Lb block, Smax cache rows.
#pragma once

#include <cstdint>

#include "llada/dtype.h"
#include "llada/status.h"

#ifdef LLADA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace llada {

enum class AttentionMask : int {
  kBlockCausal = 0,  // bottom-right aligned: k visible iff blk(k_pos) <= blk(q_pos), q_pos = i + len_k - len_q
  kBd3 = 1,          // [x_t | x_0] block-diffusion training layout (len_q == len_k == 2n)
};

// Forward: out = softmax(scale * q k^T + mask) v and lse = log-sum-exp of the masked scaled scores.
// A query that sees no key gets out = 0 and lse = -inf.
struct BlockAttentionParams {
  const void* q = nullptr;  // [Tq, Hq, D]
  const void* k = nullptr;  // [Tk, Hkv, D]
  const void* v = nullptr;  // [Tk, Hkv, D]
  DType dtype = DType::kFloat32;  // of q, k, v and out
  int64_t q_row_stride = 0, q_head_stride = 0;  // in elements
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  const int32_t* cu_seqlens_q = nullptr;  // [S + 1]
  const int32_t* cu_seqlens_k = nullptr;  // [S + 1]
  int64_t num_seqs = 0;                   // S
  int64_t total_q = 0, total_k = 0;       // Tq, Tk (= cu_seqlens_q[S], cu_seqlens_k[S])
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  AttentionMask mask = AttentionMask::kBlockCausal;
  int64_t block_size = 1;
  float softmax_scale = 1.0f;

  void* out = nullptr;    // [Tq, Hq, D] contiguous, of dtype
  float* lse = nullptr;   // [Tq, Hq] contiguous
};

// Backward of the forward above. `out`, `dout`, `dq`, `dk`, `dv` are contiguous and of `dtype`.
// dlse (optional, nullptr when the lse output carries no gradient) adds d lse / d scores = P to dS.
struct BlockAttentionBwdParams {
  BlockAttentionParams fwd;        // inputs, strides, mask; fwd.out and fwd.lse are read here
  const void* dout = nullptr;      // [Tq, Hq, D]
  const float* dlse = nullptr;     // [Tq, Hq] or nullptr
  void* dq = nullptr;              // [Tq, Hq, D]
  void* dk = nullptr;              // [Tk, Hkv, D]
  void* dv = nullptr;              // [Tk, Hkv, D]
};

// Decoding: the Lb queries of sequence b see the first cache_seqlens[b] rows of its cache and all Lb new
// keys, without a mask inside the block. The cache is contiguous per sequence, or paged: with block_table
// set, k_cache / v_cache are pools of pages [num_pages, page_size, Hkv, D] and cached row r of sequence b is
// row r % page_size of page block_table[b * max_pages + r / page_size] (entries past a sequence's last page
// are never read). The CPU kernel takes validated indices; the CUDA kernel clamps lengths to
// [0, cache_capacity] and page ids to [0, num_pages) so that unvalidated device values never read outside
// the cache.
struct BlockAttentionDecodeParams {
  const void* q = nullptr;        // [B, Lb, Hq, D] contiguous
  const void* k_cache = nullptr;  // [B, Smax, Hkv, D] contiguous, or [num_pages, page_size, Hkv, D] when paged
  const void* v_cache = nullptr;  // as k_cache
  const int32_t* cache_seqlens = nullptr;  // [B], each in [0, cache_capacity] (host memory for the CPU kernel, device for CUDA)
  const void* k_new = nullptr;    // [B, Lb, Hkv, D] contiguous
  const void* v_new = nullptr;    // [B, Lb, Hkv, D] contiguous
  DType dtype = DType::kFloat32;
  int64_t batch = 0, block = 0, cache_capacity = 0;  // B, Lb, the most cache rows of a sequence (Smax, or max_pages * page_size)
  int64_t max_cache_seqlen = 0;   // a bound of cache_seqlens known on the host (<= cache_capacity): sizes split-KV
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  float softmax_scale = 1.0f;
  const int32_t* block_table = nullptr;  // [B, max_pages] contiguous, or nullptr: the contiguous cache (same memory as cache_seqlens)
  int64_t max_pages = 0, page_size = 0, num_pages = 0;

  void* out = nullptr;   // [B, Lb, Hq, D] contiguous, of dtype
  float* lse = nullptr;  // [B, Lb, Hq]
};

// C++ CPU kernels (OpenMP over sequence x query tile x head). fp32 and bf16; any D.
Status block_attention_fwd_cpu(const BlockAttentionParams& p);
Status block_attention_bwd_cpu(const BlockAttentionBwdParams& p);
Status block_attention_decode_cpu(const BlockAttentionDecodeParams& p);

// Which CUDA kernels run the forward and the backward's main step.
enum class AttentionKernel : int {
  kAuto = 0,    // kHopper where the device and the inputs allow it, kFlash2 otherwise
  kFlash2 = 1,  // FlashAttention-2 style (SM80 tensor-core MMA, cp.async), any sm_80+ GPU
  kHopper = 2,  // wgmma + TMA, warp-specialised: sm_90a builds on sm_90 devices, 16-byte aligned rows
};  // Inputs without queries or keys always run kFlash2: there is nothing to load.

#ifdef LLADA_WITH_CUDA
// CUDA forward (CuTe), asynchronous on `stream`: bf16 and fp16, D in {64, 128} (kBadArgument otherwise).
// kHopper returns kNotCompiled on a device without sm_90a code and kBadArgument on inputs it does not take.
Status block_attention_fwd_cuda(const BlockAttentionParams& p, cudaStream_t stream,
                                AttentionKernel kernel = AttentionKernel::kAuto);
// CUDA backward (FlashAttention-2 style, same dtypes and head dims). `workspace` is device memory of
// block_attention_bwd_cuda_workspace_bytes(p) bytes (the row deltas and an fp32 dq).
// `kernel` picks its main kernel as for the forward (kHopper: wgmma + TMA on sm_90a).
Status block_attention_bwd_cuda(const BlockAttentionBwdParams& p, void* workspace, cudaStream_t stream,
                                AttentionKernel kernel = AttentionKernel::kAuto);
int64_t block_attention_bwd_cuda_workspace_bytes(const BlockAttentionBwdParams& p);
// The decode form on the forward kernel, reading the cache in place; cache_seqlens and block_table are device
// pointers here. `workspace` is device memory of block_attention_decode_cuda_workspace_bytes(p) bytes (the
// partial results of split-KV, runs of a fixed number of keys: attention/key_split.h; 0 bytes and nullptr
// where max_cache_seqlen + Lb keys fit in one run).
Status block_attention_decode_cuda(const BlockAttentionDecodeParams& p, void* workspace, cudaStream_t stream);
int64_t block_attention_decode_cuda_workspace_bytes(const BlockAttentionDecodeParams& p);
#endif

}  // namespace llada
