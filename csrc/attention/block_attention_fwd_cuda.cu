// CUDA forward (docs/ARCHITECTURE.md, Block attention) on CuTe: a FlashAttention-2-style kernel for sm_80
// and sm_90 (SM80 bf16/fp16 tensor-core MMA, fp32 accumulation), bf16/fp16, D in {64, 128}.
//
// One thread block (4 warps) is one (sequence, query tile of 64 rows, query head). It walks the key
// tiles of its sequence with the shared tile classification (attention/block_mask.h): tiles the mask
// removes are skipped, full tiles are computed without evaluating the mask. Per key tile:
//   S = Q K^T on tensor cores -> masked, scaled scores and the online softmax in registers (each row
//   held by a quad of lanes) -> P (bf16/fp16) in shared memory -> O = alpha O + P V on tensor cores.
// The decode form runs the same kernel with another view of the documents (DecodeDocs): the current block's
// queries against the sequence's cache rows [0, cache_seqlens[b]) followed by its own Lb keys, read in place
// from the cache (contiguous, or through the sequence's page list) and from k_new / v_new, with no mask inside
// (one block spanning the whole key range). Where the keys reach past one run of kKeysPerSplit, they are split
// into runs of that fixed size (split-KV, attention/key_split.h, which says why the size is fixed): one thread
// block per run writes a partial result to the workspace, and a second kernel merges them.
// Key and value tiles are double-buffered: cp.async copies tile t + 1 while tile t is computed (16-byte
// aligned rows; others load synchronously). ldmatrix operand loads are left for tuning.
// The entry point block_attention_fwd_cuda runs the Hopper kernel (block_attention_fwd_sm90.cu) instead on
// sm_90 when the inputs allow it, unless told otherwise (AttentionKernel).
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/tensor.hpp>

#include "attention/attention_cuda_tile.cuh"
#include "attention/block_attention_sm90.h"
#include "attention/block_mask.h"
#include "attention/key_split.h"
#include "attention/softmax_rule.h"
#include "common/cuda_check.h"
#include "llada/attention.h"

namespace llada {
namespace {

using namespace cute;
using namespace attention_cuda;

// Rows of Q, K, V and P are padded by kPad elements: the MMA operand reads of a warp then fall in 32
// different banks instead of 4.
template <class T, int D>
struct Smem {
  static constexpr int kPitch = D + kPad;       // of q, k, v rows
  static constexpr int kPitchP = kBK + kPad;    // of p rows
  T q[kBQ * kPitch];      // [BQ, D]
  T k[2 * kBK * kPitch];  // [2][BK, D]: the tile in use and the next one in flight
  T v[2 * kBK * kPitch];  // [2][BK, D]
  T p[kBQ * kPitchP];     // [BQ, BK] probabilities
};

// Everything the kernel reads besides the documents; q, out and lse rows are [rows, heads_q, ...].
// With splits > 1 (the decode form's split-KV), block z covers run z of each query tile's key tiles and
// writes its run's normalised output and log-sum-exp to part_out / part_lse; merge_splits_kernel combines them.
struct FwdArgs {
  const void* q;
  int64_t q_row_stride, q_head_stride;
  int64_t heads_q, heads_kv;
  float softmax_scale;
  void* out;    // [rows, Hq, D] contiguous
  float* lse;   // [rows, Hq]
  int splits = 1;
  int64_t rows = 0;           // of q / out (with splits > 1)
  float* part_out = nullptr;  // [splits, rows, Hq, D]
  float* part_lse = nullptr;  // [splits, rows, Hq]
};

template <class T, int D, class Docs>
__global__ void __launch_bounds__(kThreads) block_attention_fwd_kernel(const FwdArgs p, const Docs docs, int q_tiles) {
  extern __shared__ __align__(16) char smem_raw[];
  Smem<T, D>& sm = *reinterpret_cast<Smem<T, D>*>(smem_raw);

  const int64_t seq = blockIdx.x / q_tiles;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % q_tiles) * kBQ;
  const int64_t h = blockIdx.y;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const Doc<T> doc = docs.template get<T>(seq, hk);
  const int64_t cq = doc.q_begin;
  const DocMask& dm = doc.mask;
  if (q0 >= dm.len_q) return;
  const int nq = static_cast<int>(min_i64(kBQ, dm.len_q - q0));

  const T* q = static_cast<const T*>(p.q) + (cq + q0) * p.q_row_stride + h * p.q_head_stride;
  const Rows<T> q_rows = packed_rows(q, p.q_row_stride);
  constexpr int kVec = 16 / sizeof(T);
  const bool async = q_rows.aligned16(kVec) && doc.k.aligned16(kVec) && doc.v.aligned16(kVec);

  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<T>::type>, Layout<Shape<_4, _1, _1>>>;
  using S = Smem<T, D>;
  TiledMma mma;
  auto thr = mma.get_slice(threadIdx.x);
  const auto q_layout = make_layout(make_shape(Int<kBQ>{}, Int<D>{}), make_stride(Int<S::kPitch>{}, Int<1>{}));
  const auto k_layout = make_layout(make_shape(Int<kBK>{}, Int<D>{}), make_stride(Int<S::kPitch>{}, Int<1>{}));
  // V [BK, D] read as the (n = D, k = BK) operand of O = P V.
  const auto vt_layout = make_layout(make_shape(Int<D>{}, Int<kBK>{}), make_stride(Int<1>{}, Int<S::kPitch>{}));
  const auto p_layout = make_layout(make_shape(Int<kBQ>{}, Int<kBK>{}), make_stride(Int<S::kPitchP>{}, Int<1>{}));
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), q_layout);
  Tensor sP = make_tensor(make_smem_ptr(sm.p), p_layout);
  Tensor tSsQ = thr.partition_A(sQ);
  Tensor tSrQ = thr.partition_fragment_A(sQ);
  Tensor tSrK = thr.partition_fragment_B(make_tensor(make_smem_ptr(sm.k), k_layout));
  Tensor tOsP = thr.partition_A(sP);
  Tensor tOrP = thr.partition_fragment_A(sP);
  Tensor tOrV = thr.partition_fragment_B(make_tensor(make_smem_ptr(sm.v), vt_layout));
  Tensor tSrS = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kBK>>{});  // fp32
  Tensor tOrO = partition_fragment_C(mma, Shape<Int<kBQ>, Int<D>>{});    // fp32
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<kBK>>{}));
  Tensor tOcO = thr.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<D>>{}));
  clear(tOrO);

  // Softmax in registers: a thread's accumulator entries lie on two rows of its warp's 16, row
  // warp * 16 + lane / 4 (half 0) and 8 rows below (half 1), shared with the other lanes of its quad.
  const auto half = [](int r) { return (r & 15) >> 3; };
  const float scale_log2 = p.softmax_scale * kLog2e;
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.0f, 0.0f};

  // Key tiles in order, skipping those the mask removes; tile t + 1 is copied in while tile t is computed.
  const RowRange all_keys = key_range(dm, q0, q0 + nq);
  const RowRange keys = p.splits > 1 ? split_keys(all_keys, static_cast<int>(blockIdx.z)) : all_keys;
  const auto kept_tile_from = [&](int64_t k0) {
    for (; k0 < keys.end; k0 += kBK)
      if (classify_tile(dm, q0, q0 + nq, k0, k0 + min_i64(kBK, dm.len_k - k0)) != TileKind::kSkip) break;
    return k0;
  };
  const auto start_tile = [&](int buf, int64_t k0) {
    const int nk = static_cast<int>(min_i64(kBK, dm.len_k - k0));
    load_rows_async<T, D, kBK, S::kPitch>(sm.k + buf * kBK * S::kPitch, doc.k, k0, nk, async);
    load_rows_async<T, D, kBK, S::kPitch>(sm.v + buf * kBK * S::kPitch, doc.v, k0, nk, async);
  };
  load_rows_async<T, D, kBQ, S::kPitch>(sm.q, q_rows, 0, nq, async);
  int64_t k0 = keys.begin < keys.end ? kept_tile_from((keys.begin / kBK) * kBK) : keys.end;  // an empty run: none
  if (k0 < keys.end) start_tile(0, k0);
  cp_async_commit();
  for (int buf = 0; k0 < keys.end; buf ^= 1) {
    const int64_t k_next = kept_tile_from(k0 + kBK);
    if (k_next < keys.end) {
      start_tile(buf ^ 1, k_next);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile k0 (and Q) in shared memory for every thread

    const int nk = static_cast<int>(min_i64(kBK, dm.len_k - k0));
    const TileKind kind = classify_tile(dm, q0, q0 + nq, k0, k0 + nk);
    Tensor tSsK = thr.partition_B(make_tensor(make_smem_ptr(sm.k + buf * kBK * S::kPitch), k_layout));
    Tensor tOsV = thr.partition_B(make_tensor(make_smem_ptr(sm.v + buf * kBK * S::kPitch), vt_layout));
    clear(tSrS);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      copy(tSsQ(_, _, kb), tSrQ(_, _, kb));
      copy(tSsK(_, _, kb), tSrK(_, _, kb));
      gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
    }

    float mx[2] = {kNegInf, kNegInf};
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int r = get<0>(tScS(i)), j = get<1>(tScS(i));
      const bool keep = r < nq && j < nk && (kind == TileKind::kFull || mask_keep(dm, q0 + r, k0 + j));
      tSrS(i) = keep ? tSrS(i) * scale_log2 : kNegInf;
      if (half(r)) mx[1] = max_nan(mx[1], tSrS(i));
      else mx[0] = max_nan(mx[0], tSrS(i));
    }
    float m_new[2], alpha[2], sum[2] = {0.0f, 0.0f};
    CUTE_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      m_new[hh] = max_nan(m_run[hh], quad_max(mx[hh]));
      alpha[hh] = m_run[hh] == kNegInf ? 0.0f : exp2f(m_run[hh] - m_new[hh]);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int r = get<0>(tScS(i)), j = get<1>(tScS(i));
      const float m = half(r) ? m_new[1] : m_new[0];
      const float pr = tSrS(i) == kNegInf ? 0.0f : exp2f(tSrS(i) - m);
      sm.p[r * S::kPitchP + j] = T(pr);
      if (half(r)) sum[1] += pr;
      else sum[0] += pr;
    }
    CUTE_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      l_run[hh] = l_run[hh] * alpha[hh] + quad_sum(sum[hh]);
      m_run[hh] = m_new[hh];
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= half(get<0>(tOcO(i))) ? alpha[1] : alpha[0];
    __syncthreads();  // P in shared memory for every thread

    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      copy(tOsP(_, _, kb), tOrP(_, _, kb));
      copy(tOsV(_, _, kb), tOrV(_, _, kb));
      gemm(mma, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
    }
    __syncthreads();  // tile k0's buffers and P are consumed before they are written again
    k0 = k_next;
  }
  cp_async_wait<0>();

  const int lane = threadIdx.x % 32;
  const int64_t part = static_cast<int64_t>(blockIdx.z) * p.rows;  // this run's rows in part_out / part_lse
  float* lse = p.splits > 1 ? p.part_lse + part * p.heads_q : p.lse;
  if (lane % 4 == 0) {
    CUTE_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      const int r = (threadIdx.x / 32) * 16 + lane / 4 + hh * 8;
      if (r < nq) lse[(cq + q0 + r) * p.heads_q + h] = row_lse(m_run[hh], log2f(l_run[hh])) * kLn2;
    }
  }
  const float scale[2] = {row_out_scale(m_run[0], l_run[0]), row_out_scale(m_run[1], l_run[1])};
  const int64_t first = ((cq + q0) * p.heads_q + h) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int r = get<0>(tOcO(i)), d = get<1>(tOcO(i));
    if (r >= nq) continue;
    const float o = row_out(tOrO(i), scale[half(r)]);
    const int64_t at = first + static_cast<int64_t>(r) * p.heads_q * D + d;
    if (p.splits > 1) p.part_out[part * p.heads_q * D + at] = o;
    else static_cast<T*>(p.out)[at] = T(o);
  }
}

// out and lse of each (row, head) from the runs' partial results: one warp per (row, head).
template <class T, int D>
__global__ void merge_splits_kernel(const FwdArgs p) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // row * Hq + head
  const int lane = threadIdx.x % 32;
  if (item >= p.rows * p.heads_q) return;
  const int64_t stride = p.rows * p.heads_q;  // between runs
  const float lse = merged_lse(p.part_lse + item, p.splits, stride);
  CUTE_UNROLL
  for (int d = lane; d < D; d += 32) {
    float o = 0.0f;
    for (int s = 0; s < p.splits; ++s)
      o += merge_weight(p.part_lse[s * stride + item], lse) * p.part_out[(s * stride + item) * D + d];
    static_cast<T*>(p.out)[item * D + d] = T(o);
  }
  if (lane == 0) p.lse[item] = lse;
}

template <class T, int D, class Docs>
Status launch(const FwdArgs& args, const Docs& docs, int64_t num_seqs, int64_t max_seqlen_q, cudaStream_t stream) {
  const int64_t q_tiles = (max_seqlen_q + kBQ - 1) / kBQ;
  if (q_tiles == 0 || num_seqs == 0 || args.heads_q == 0) return Status::kOk;
  if (q_tiles * num_seqs > INT32_MAX || args.heads_q > 65535) return Status::kBadArgument;
  const dim3 grid(static_cast<unsigned>(q_tiles * num_seqs), static_cast<unsigned>(args.heads_q),
                  static_cast<unsigned>(args.splits));
  const size_t smem = sizeof(Smem<T, D>);
  auto kernel = block_attention_fwd_kernel<T, D, Docs>;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(args, docs, static_cast<int>(q_tiles));
  if (args.splits > 1) {
    LLADA_RETURN_IF_CUDA_ERROR(cudaGetLastError());
    const int64_t threads = args.rows * args.heads_q * 32;
    if ((threads + 255) / 256 > INT32_MAX) return Status::kBadArgument;
    merge_splits_kernel<T, D><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(args);
  }
  LLADA_RETURN_LAUNCH_STATUS();
}

template <class T, class Docs>
Status dispatch_head_dim(int64_t head_dim, const FwdArgs& args, const Docs& docs, int64_t num_seqs,
                         int64_t max_seqlen_q, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch<T, 64>(args, docs, num_seqs, max_seqlen_q, stream);
    case 128: return launch<T, 128>(args, docs, num_seqs, max_seqlen_q, stream);
    default: return Status::kBadArgument;
  }
}

template <class Docs>
Status dispatch(DType dtype, int64_t head_dim, const FwdArgs& args, const Docs& docs, int64_t num_seqs,
                int64_t max_seqlen_q, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return dispatch_head_dim<cutlass::bfloat16_t>(head_dim, args, docs, num_seqs, max_seqlen_q, stream);
    case DType::kFloat16:
      return dispatch_head_dim<cutlass::half_t>(head_dim, args, docs, num_seqs, max_seqlen_q, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace

Status block_attention_fwd_cuda(const BlockAttentionParams& p, cudaStream_t stream, AttentionKernel kernel) {
  if (p.block_size < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) return Status::kBadArgument;
  const bool empty = p.total_q == 0 || p.total_k == 0;  // nothing for the Hopper kernel to load
  if (kernel != AttentionKernel::kFlash2 && !empty) {
    int device = 0, major = 0;
    LLADA_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
    LLADA_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (kernel == AttentionKernel::kHopper)
      return major == 9 ? block_attention_fwd_sm90(p, stream) : Status::kNotCompiled;
    if (major == 9 && block_attention_fwd_sm90_supported(p)) {
      const Status s = block_attention_fwd_sm90(p, stream);
      if (s != Status::kNotCompiled) return s;
    }
  }
  const FwdArgs args{p.q, p.q_row_stride, p.q_head_stride, p.heads_q, p.heads_kv, p.softmax_scale, p.out, p.lse};
  const PackedDocs docs{p.cu_seqlens_q, p.cu_seqlens_k, p.k, p.v, p.k_row_stride, p.k_head_stride,
                        p.v_row_stride, p.v_head_stride, p.mask, p.block_size};
  return dispatch(p.dtype, p.head_dim, args, docs, p.num_seqs, p.max_seqlen_q, stream);
}

namespace {

static_assert(kKeysPerSplit % kBK == 0, "runs of whole key tiles");

// Runs of keys per query tile of the decode form (attention/key_split.h): enough for the longest sequence.
int decode_splits(const BlockAttentionDecodeParams& p) { return key_splits(p.max_cache_seqlen + p.block); }

}  // namespace

int64_t block_attention_decode_cuda_workspace_bytes(const BlockAttentionDecodeParams& p) {
  const int splits = decode_splits(p);
  if (splits == 1) return 0;
  return static_cast<int64_t>(splits) * p.batch * p.block * p.heads_q * (p.head_dim + 1) *
         static_cast<int64_t>(sizeof(float));
}

Status block_attention_decode_cuda(const BlockAttentionDecodeParams& p, void* workspace, cudaStream_t stream) {
  if (p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) return Status::kBadArgument;
  if (p.batch == 0 || p.block == 0 || p.heads_q == 0) return Status::kOk;  // empty out and lse
  FwdArgs args{p.q, p.heads_q * p.head_dim, p.head_dim, p.heads_q, p.heads_kv, p.softmax_scale, p.out, p.lse};
  args.splits = decode_splits(p);
  if (args.splits > 65535) return Status::kBadArgument;
  if (args.splits > 1) {
    if (workspace == nullptr) return Status::kBadArgument;
    args.rows = p.batch * p.block;
    args.part_lse = static_cast<float*>(workspace);                     // [splits, B * Lb, Hq]
    args.part_out = args.part_lse + args.splits * args.rows * p.heads_q;  // [splits, B * Lb, Hq, D]
  }
  const bool paged = p.block_table != nullptr;
  if (paged && (p.page_size < 1 || p.max_pages * p.page_size != p.cache_capacity)) return Status::kBadArgument;
  const int64_t capacity = paged && p.num_pages == 0 ? 0 : p.cache_capacity;  // an empty pool holds no row
  const DecodeDocs docs{p.cache_seqlens, p.k_cache, p.v_cache, p.k_new, p.v_new, p.block, capacity,
                        p.heads_kv, p.head_dim, p.block_table, p.max_pages, p.page_size, p.num_pages};
  return dispatch(p.dtype, p.head_dim, args, docs, p.batch, p.block, stream);
}

}  // namespace llada
