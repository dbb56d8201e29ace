// CUDA backward (docs/ARCHITECTURE.md, Block attention) on CuTe: FlashAttention-2's backward for sm_80 and
// sm_90 (SM80 bf16/fp16 tensor-core MMA, fp32 accumulation), bf16/fp16, D in {64, 128}.
//
// Three launches on the caller's stream, no allocation (the caller passes the workspace):
//   1. delta[row, h] = sum_d dout * out - dlse (fp32), and dq_accum = 0.
//   2. One thread block (4 warps) per (sequence, key tile of 64, kv head) keeps dK and dV of its keys in
//      registers and walks every query head of its GQA group and every query tile that may see its keys
//      (attention/block_mask.h: query_range, then classify_tile to skip or drop the mask). Per tile:
//        S = Q K^T, P = exp(scale S - lse) where kept       (registers)
//        dP = dO V^T, dS = P (dP - delta)                    (registers; P and dS to shared memory)
//        dV += P^T dO, dK += dS^T Q                          (tensor cores, operands from shared memory)
//        dq_accum += scale dS K                              (fp32 atomics)
//      then writes scale dK and dV.
//   3. dq = dq_accum in the input dtype.
// On sm_90 the Hopper kernel (block_attention_bwd_sm90.cu) takes step 2 where the inputs allow it, unless told
// otherwise (AttentionKernel).
// Q and dO tiles are double-buffered: cp.async copies pair t + 1 while pair t is computed (16-byte aligned
// rows; others load synchronously).
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/tensor.hpp>

#include "attention/attention_cuda_tile.cuh"
#include "attention/block_attention_sm90.h"
#include "attention/block_mask.h"
#include "common/cuda_check.h"
#include "llada/attention.h"

namespace llada {
namespace {

using namespace cute;
using namespace attention_cuda;

template <class T, int D>
struct BwdSmem {
  T q[2 * kBQ * D];     // [2][BQ, D]: the query tile in use and the next one in flight
  T dout[2 * kBQ * D];  // [2][BQ, D]
  T k[kBK * D];         // [BK, D]
  T v[kBK * D];         // [BK, D]
  T p[kBQ * kBK];       // [BQ, BK] probabilities
  T ds[kBQ * kBK];      // [BQ, BK] d scores (unscaled)
  float lse[2][kBQ];    // log2 units; -inf where the row sees no key or lies past the tile
  float delta[2][kBQ];
};

__device__ __forceinline__ float to_float(cutlass::bfloat16_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(cutlass::half_t x) { return static_cast<float>(x); }

// delta[r] = dout[r] . out[r] - dlse[r] for the Tq * Hq rows (one warp a row); dq_accum = 0.
template <class T, int D>
__global__ void bwd_preprocess_kernel(const BlockAttentionBwdParams p, int64_t rows, float* delta, float* dq_accum) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows) return;
  const T* o = static_cast<const T*>(p.fwd.out) + warp * D;
  const T* g = static_cast<const T*>(p.dout) + warp * D;
  float acc = 0.0f;
  for (int d = lane; d < D; d += 32) {
    acc += to_float(o[d]) * to_float(g[d]);
    dq_accum[warp * D + d] = 0.0f;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[warp] = acc - (p.dlse != nullptr ? p.dlse[warp] : 0.0f);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) block_attention_bwd_kernel(const BlockAttentionBwdParams bp, int k_tiles,
                                                                       const float* delta, float* dq_accum) {
  extern __shared__ __align__(16) char smem_raw[];
  BwdSmem<T, D>& sm = *reinterpret_cast<BwdSmem<T, D>*>(smem_raw);
  const BlockAttentionParams& p = bp.fwd;

  const int64_t seq = blockIdx.x / k_tiles;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x % k_tiles) * kBK;
  const int64_t hk = blockIdx.y;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t cq = p.cu_seqlens_q[seq], ck = p.cu_seqlens_k[seq];
  const DocMask dm{p.mask, p.block_size, p.cu_seqlens_q[seq + 1] - cq, p.cu_seqlens_k[seq + 1] - ck};
  if (k0 >= dm.len_k) return;
  const int nk = static_cast<int>(min_i64(kBK, dm.len_k - k0));

  const T* k = static_cast<const T*>(p.k) + (ck + k0) * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + (ck + k0) * p.v_row_stride + hk * p.v_head_stride;
  load_rows<T, D, kBK>(sm.k, packed_rows(k, p.k_row_stride), 0, nk);
  load_rows<T, D, kBK>(sm.v, packed_rows(v, p.v_row_stride), 0, nk);

  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<T>::type>, Layout<Shape<_4, _1, _1>>>;
  TiledMma mma;
  auto thr = mma.get_slice(threadIdx.x);
  const auto row_major = [](auto rows, auto cols) { return make_layout(make_shape(rows, cols), LayoutRight{}); };
  const auto col_major = [](auto rows, auto cols) {
    return make_layout(make_shape(rows, cols), make_stride(Int<1>{}, rows));
  };
  using BQ = Int<kBQ>;
  using BK = Int<kBK>;
  using DD = Int<D>;
  const auto q_layout = row_major(BQ{}, DD{});    // (q, d) of Q and dO
  const auto qt_layout = col_major(DD{}, BQ{});   // (d, q) views of Q and dO
  Tensor sK = make_tensor(make_smem_ptr(sm.k), row_major(BK{}, DD{}));       // (k, d)
  Tensor sV = make_tensor(make_smem_ptr(sm.v), row_major(BK{}, DD{}));       // (k, d)
  Tensor sdS = make_tensor(make_smem_ptr(sm.ds), row_major(BQ{}, BK{}));     // (q, k)
  Tensor sPt = make_tensor(make_smem_ptr(sm.p), col_major(BK{}, BQ{}));      // (k, q) view of P [q, k]
  Tensor sdSt = make_tensor(make_smem_ptr(sm.ds), col_major(BK{}, BQ{}));    // (k, q) view of dS
  Tensor sKt = make_tensor(make_smem_ptr(sm.k), col_major(DD{}, BK{}));      // (d, k) view of K

  // S = Q K^T and dP = dO V^T: (q, k) accumulators with one partitioning, so P and dP match element-wise.
  Tensor tSrQ = thr.partition_fragment_A(make_tensor(make_smem_ptr(sm.q), q_layout));
  Tensor tSsK = thr.partition_B(sK);
  Tensor tSrK = thr.partition_fragment_B(sK);
  Tensor tSrdO = thr.partition_fragment_A(make_tensor(make_smem_ptr(sm.dout), q_layout));
  Tensor tSsV = thr.partition_B(sV);
  Tensor tSrV = thr.partition_fragment_B(sV);
  Tensor tSrS = partition_fragment_C(mma, Shape<BQ, BK>{});
  Tensor tSrdP = partition_fragment_C(mma, Shape<BQ, BK>{});
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<BQ, BK>{}));
  // dV += P^T dO and dK += dS^T Q: (k, d) accumulators.
  Tensor tKsPt = thr.partition_A(sPt);
  Tensor tKrPt = thr.partition_fragment_A(sPt);
  Tensor tKsdSt = thr.partition_A(sdSt);
  Tensor tKrdSt = thr.partition_fragment_A(sdSt);
  Tensor tKrdOt = thr.partition_fragment_B(make_tensor(make_smem_ptr(sm.dout), qt_layout));
  Tensor tKrQt = thr.partition_fragment_B(make_tensor(make_smem_ptr(sm.q), qt_layout));
  Tensor tKrdV = partition_fragment_C(mma, Shape<BK, DD>{});
  Tensor tKrdK = partition_fragment_C(mma, Shape<BK, DD>{});
  Tensor tKcK = thr.partition_C(make_identity_tensor(Shape<BK, DD>{}));
  // dQ += dS K: (q, d) accumulator, flushed to dq_accum after every tile.
  Tensor tQsdS = thr.partition_A(sdS);
  Tensor tQrdS = thr.partition_fragment_A(sdS);
  Tensor tQsKt = thr.partition_B(sKt);
  Tensor tQrKt = thr.partition_fragment_B(sKt);
  Tensor tQrdQ = partition_fragment_C(mma, Shape<BQ, DD>{});
  Tensor tQcQ = thr.partition_C(make_identity_tensor(Shape<BQ, DD>{}));
  clear(tKrdV);
  clear(tKrdK);

  // The (query head of the group, query tile) pairs that see this key tile, in order, skipping tiles the
  // mask removes; pair t + 1's Q and dO are copied in while pair t is computed.
  const float scale_log2 = p.softmax_scale * kLog2e;
  const RowRange queries = query_range(dm, k0, k0 + nk);
  const int64_t q_first = (queries.begin / kBQ) * kBQ;
  struct Item {
    int64_t g, q0;
  };
  const auto kept_item_from = [&](int64_t g, int64_t q0) {
    for (; g < group; ++g, q0 = q_first)
      for (; q0 < queries.end; q0 += kBQ)
        if (classify_tile(dm, q0, q0 + min_i64(kBQ, dm.len_q - q0), k0, k0 + nk) != TileKind::kSkip)
          return Item{g, q0};
    return Item{group, 0};
  };
  const auto start_item = [&](int buf, Item it) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t h = hk * group + it.g;
    const int nq = static_cast<int>(min_i64(kBQ, dm.len_q - it.q0));
    const T* q = static_cast<const T*>(p.q) + (cq + it.q0) * p.q_row_stride + h * p.q_head_stride;
    const T* dout = static_cast<const T*>(bp.dout) + ((cq + it.q0) * p.heads_q + h) * D;
    const Rows<T> q_rows = packed_rows(q, p.q_row_stride), dout_rows = packed_rows(dout, p.heads_q * D);
    const bool async = q_rows.aligned16(kVec) && dout_rows.aligned16(kVec);
    load_rows_async<T, D, kBQ>(sm.q + buf * kBQ * D, q_rows, 0, nq, async);
    load_rows_async<T, D, kBQ>(sm.dout + buf * kBQ * D, dout_rows, 0, nq, async);
    for (int r = threadIdx.x; r < kBQ; r += kThreads) {
      const int64_t row = (cq + it.q0 + r) * p.heads_q + h;
      sm.lse[buf][r] = r < nq ? p.lse[row] * kLog2e : kNegInf;
      sm.delta[buf][r] = r < nq ? delta[row] : 0.0f;
    }
  };
  Item cur = kept_item_from(0, q_first);
  if (cur.g < group) start_item(0, cur);
  cp_async_commit();
  for (int buf = 0; cur.g < group; buf ^= 1) {
    const Item next = kept_item_from(cur.g, cur.q0 + kBQ);
    if (next.g < group) {
      start_item(buf ^ 1, next);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this pair's Q, dO, lse and delta (and K, V) in shared memory for every thread

    const int64_t h = hk * group + cur.g, q0 = cur.q0;
    const int nq = static_cast<int>(min_i64(kBQ, dm.len_q - q0));
    const TileKind kind = classify_tile(dm, q0, q0 + nq, k0, k0 + nk);
    const float* lse = sm.lse[buf];
    const float* dlt = sm.delta[buf];
    Tensor tSsQ = thr.partition_A(make_tensor(make_smem_ptr(sm.q + buf * kBQ * D), q_layout));
    Tensor tSsdO = thr.partition_A(make_tensor(make_smem_ptr(sm.dout + buf * kBQ * D), q_layout));
    Tensor tKsdOt = thr.partition_B(make_tensor(make_smem_ptr(sm.dout + buf * kBQ * D), qt_layout));
    Tensor tKsQt = thr.partition_B(make_tensor(make_smem_ptr(sm.q + buf * kBQ * D), qt_layout));

    clear(tSrS);
    clear(tSrdP);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      copy(tSsQ(_, _, kb), tSrQ(_, _, kb));
      copy(tSsK(_, _, kb), tSrK(_, _, kb));
      gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
      copy(tSsdO(_, _, kb), tSrdO(_, _, kb));
      copy(tSsV(_, _, kb), tSrV(_, _, kb));
      gemm(mma, tSrdO(_, _, kb), tSrV(_, _, kb), tSrdP);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int r = get<0>(tScS(i)), j = get<1>(tScS(i));
      const bool keep = lse[r] != kNegInf && j < nk && (kind == TileKind::kFull || mask_keep(dm, q0 + r, k0 + j));
      const float pr = keep ? exp2f(tSrS(i) * scale_log2 - lse[r]) : 0.0f;
      sm.p[r * kBK + j] = T(pr);
      sm.ds[r * kBK + j] = T(keep ? pr * (tSrdP(i) - dlt[r]) : 0.0f);  // 0, never 0 * NaN, where masked
    }
    __syncthreads();

    clear(tQrdQ);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tKrPt); ++kb) {
      copy(tKsPt(_, _, kb), tKrPt(_, _, kb));
      copy(tKsdOt(_, _, kb), tKrdOt(_, _, kb));
      gemm(mma, tKrPt(_, _, kb), tKrdOt(_, _, kb), tKrdV);
      copy(tKsdSt(_, _, kb), tKrdSt(_, _, kb));
      copy(tKsQt(_, _, kb), tKrQt(_, _, kb));
      gemm(mma, tKrdSt(_, _, kb), tKrQt(_, _, kb), tKrdK);
    }
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tQrdS); ++kb) {
      copy(tQsdS(_, _, kb), tQrdS(_, _, kb));
      copy(tQsKt(_, _, kb), tQrKt(_, _, kb));
      gemm(mma, tQrdS(_, _, kb), tQrKt(_, _, kb), tQrdQ);
    }
    float* dq = dq_accum + ((cq + q0) * p.heads_q + h) * D;
    CUTE_UNROLL
    for (int i = 0; i < size(tQrdQ); ++i) {
      const int r = get<0>(tQcQ(i)), d = get<1>(tQcQ(i));
      if (r < nq) atomicAdd(dq + static_cast<int64_t>(r) * p.heads_q * D + d, p.softmax_scale * tQrdQ(i));
    }
    __syncthreads();  // this pair's buffers, P and dS are consumed before they are written again
    cur = next;
  }
  cp_async_wait<0>();

  T* dk = static_cast<T*>(bp.dk) + ((ck + k0) * p.heads_kv + hk) * D;
  T* dv = static_cast<T*>(bp.dv) + ((ck + k0) * p.heads_kv + hk) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(tKrdK); ++i) {
    const int r = get<0>(tKcK(i)), d = get<1>(tKcK(i));
    if (r < nk) {
      const int64_t at = static_cast<int64_t>(r) * p.heads_kv * D + d;
      dk[at] = T(p.softmax_scale * tKrdK(i));
      dv[at] = T(tKrdV(i));
    }
  }
}

template <class T>
__global__ void dq_convert_kernel(const float* dq_accum, T* dq, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dq[i] = T(dq_accum[i]);
}

struct Workspace {
  float* delta;     // [Tq * Hq]
  float* dq_accum;  // [Tq * Hq * D]
};

Workspace carve(const BlockAttentionBwdParams& p, void* workspace) {
  float* base = static_cast<float*>(workspace);
  const int64_t rows = p.fwd.total_q * p.fwd.heads_q;
  const int64_t delta_floats = (rows + 3) / 4 * 4;  // keeps dq_accum 16-byte aligned
  return Workspace{base, base + delta_floats};
}

// The main kernel on sm_90: the Hopper one (kHopper, or kAuto where the inputs allow it), else this file's.
template <class T, int D>
Status launch(const BlockAttentionBwdParams& bp, void* workspace, cudaStream_t stream, AttentionKernel kernel,
              bool hopper_device) {
  const BlockAttentionParams& p = bp.fwd;
  const Workspace ws = carve(bp, workspace);
  const int64_t rows = p.total_q * p.heads_q;
  if (rows > 0) {
    const int64_t blocks = (rows * 32 + 255) / 256;
    if (blocks > INT32_MAX) return Status::kBadArgument;
    bwd_preprocess_kernel<T, D><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(bp, rows, ws.delta, ws.dq_accum);
    LLADA_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  }
  bool done = false;
  if (kernel == AttentionKernel::kHopper || (kernel == AttentionKernel::kAuto && hopper_device &&
                                             block_attention_bwd_sm90_supported(bp))) {
    const Status s = block_attention_bwd_sm90(bp, ws.delta, ws.dq_accum, stream);
    if (s != Status::kOk && !(s == Status::kNotCompiled && kernel == AttentionKernel::kAuto)) return s;
    done = s == Status::kOk;
  }
  const int64_t k_tiles = (p.max_seqlen_k + kBK - 1) / kBK;
  if (!done && k_tiles > 0 && p.num_seqs > 0) {
    if (k_tiles * p.num_seqs > INT32_MAX || p.heads_kv > 65535) return Status::kBadArgument;
    const dim3 grid(static_cast<unsigned>(k_tiles * p.num_seqs), static_cast<unsigned>(p.heads_kv));
    const size_t smem = sizeof(BwdSmem<T, D>);
    auto kernel = block_attention_bwd_kernel<T, D>;
    LLADA_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(bp, static_cast<int>(k_tiles), ws.delta, ws.dq_accum);
    LLADA_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  }
  if (rows > 0) {
    const int64_t n = rows * D;
    const unsigned blocks = static_cast<unsigned>(min_i64((n + 255) / 256, 65535));
    dq_convert_kernel<T><<<blocks, 256, 0, stream>>>(ws.dq_accum, static_cast<T*>(bp.dq), n);
  }
  LLADA_RETURN_LAUNCH_STATUS();
}

template <class T>
Status dispatch_head_dim(const BlockAttentionBwdParams& p, void* workspace, cudaStream_t stream,
                         AttentionKernel kernel, bool hopper_device) {
  switch (p.fwd.head_dim) {
    case 64: return launch<T, 64>(p, workspace, stream, kernel, hopper_device);
    case 128: return launch<T, 128>(p, workspace, stream, kernel, hopper_device);
    default: return Status::kBadArgument;
  }
}

}  // namespace

int64_t block_attention_bwd_cuda_workspace_bytes(const BlockAttentionBwdParams& p) {
  const int64_t rows = p.fwd.total_q * p.fwd.heads_q;
  return ((rows + 3) / 4 * 4 + rows * p.fwd.head_dim) * static_cast<int64_t>(sizeof(float));
}

Status block_attention_bwd_cuda(const BlockAttentionBwdParams& p, void* workspace, cudaStream_t stream,
                                AttentionKernel kernel) {
  const BlockAttentionParams& f = p.fwd;
  if (f.block_size < 1 || f.heads_kv < 1 || f.heads_q % f.heads_kv != 0) return Status::kBadArgument;
  if (f.total_q * f.heads_q > 0 && workspace == nullptr) return Status::kBadArgument;
  int device = 0, major = 0;
  LLADA_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  LLADA_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (f.total_q == 0 || f.total_k == 0) kernel = AttentionKernel::kFlash2;  // nothing for the Hopper kernel
  if (kernel == AttentionKernel::kHopper && major != 9) return Status::kNotCompiled;
  switch (f.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, workspace, stream, kernel, major == 9);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, workspace, stream, kernel, major == 9);
    default: return Status::kBadArgument;
  }
}

}  // namespace llada
