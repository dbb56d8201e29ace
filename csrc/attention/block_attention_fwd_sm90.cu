// Hopper forward (docs/ARCHITECTURE.md, Block attention) for sm_90a: TMA loads, wgmma, warp specialisation.
// bf16/fp16, D in {64, 128}, packed varlen layout with 16-byte aligned rows (block_attention_fwd_sm90_supported).
//
// One CTA is one (sequence, query tile of 128 rows, query head) and has three warpgroups:
//   producer     one thread issues the TMA loads: Q once, then each kept key tile's K and V into a ring of
//                kStages shared-memory stages (cutlass::PipelineTmaAsync: a full and an empty mbarrier per stage);
//   consumers    two warpgroups, 64 query rows each: S = Q K^T (wgmma, both operands in shared memory), the
//                masked online softmax in registers (a row lives in a quad of lanes), then O += P V (wgmma with
//                P in registers, V read transposed from shared memory); the stage is released to the producer.
// Producer and consumers walk the same key tiles: key_range and classify_tile (attention/block_mask.h) for the
// CTA's rows; each consumer warpgroup also skips a tile its own 64 rows do not see, and evaluates the mask only
// on partial tiles and on the tile that crosses the document's end, from the two key ranges of each of its rows
// (kept_keys). Tiles read rows past the document's end (up to the tensor's end, zero beyond): those keys are
// masked, and the consumers zero those V rows (then meet at a named barrier) so that nothing of another
// document reaches O, not even an infinite value times a zero probability.
// The output is written from registers (32-bit stores), the log-sum-exp by one lane of each quad.
// The sm_80 pass of this file compiles the kernel body out; the host only launches it where the loaded
// binary is the sm_90a one.
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "attention/attention_cuda_tile.cuh"
#include "attention/attention_sm90.cuh"
#include "attention/attention_sm90_kernel.cuh"
#include "attention/block_attention_sm90.h"
#include "attention/block_mask.h"
#include "attention/softmax_rule.h"
#include "common/cuda_check.h"

namespace llada {
namespace {

using namespace cute;
using attention_sm90::Config;
using attention_sm90::aligned_shared_storage;
using attention_sm90::make_tma_load;
using attention_sm90::make_tma_ring;
using attention_sm90::warpgroup_gemm;
using attention_cuda::kLn2;
using attention_cuda::kLog2e;
using attention_cuda::kNegInf;
using attention_cuda::quad_max;
using attention_cuda::quad_sum;


template <class T, int D>
auto make_tma_q(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return make_tma_load<T, D>(ptr, rows, row_stride, heads, head_stride, typename Config<T, D>::SmemQ{});
}

template <class T, int D>
auto make_tma_kv(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return make_tma_load<T, D>(ptr, rows, row_stride, heads, head_stride, take<0, 2>(typename Config<T, D>::SmemKV{}));
}

template <class T, int D>
struct KernelParams {
  using TmaQ = decltype(make_tma_q<T, D>(nullptr, 1, D, 1, D));
  using TmaKV = decltype(make_tma_kv<T, D>(nullptr, 1, D, 1, D));
  TmaQ tma_q;
  TmaKV tma_k, tma_v;
  int32_t total_q, total_k;  // Tq, Tk: the extents of the TMA tensors
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int32_t heads_q, heads_kv;
  int32_t q_tiles;  // query tiles per sequence
  AttentionMask mask;
  int64_t block_size;
  float scale_log2;  // softmax_scale * log2(e)
  T* out;            // [Tq, Hq, D] contiguous
  float* lse;        // [Tq, Hq]
};

template <class T, int D>
struct SharedStorage {
  using C = Config<T, D>;
  cute::array_aligned<T, cosize_v<typename C::SmemQ>, 1024> q;
  cute::array_aligned<T, cosize_v<typename C::SmemKV>, 1024> k;
  cute::array_aligned<T, cosize_v<typename C::SmemKV>, 1024> v;
  typename cutlass::PipelineTmaAsync<C::kStages>::SharedStorage pipeline;
  cutlass::arch::ClusterTransactionBarrier q_full;
};

template <class T, int D>
constexpr size_t kSmemBytes = sizeof(SharedStorage<T, D>) + 1024;  // + alignment slack of the base


// The kept key tiles of query rows [q0, q0 + nq), in order: tile k0 (a multiple of BN) is the first from
// `from` that the mask does not remove, keys.end when none is left.
template <int BN>
__device__ __forceinline__ int64_t next_kept_tile(const DocMask& dm, int64_t q0, int64_t nq, RowRange keys,
                                                  int64_t from) {
  for (; from < keys.end; from += BN)
    if (classify_tile(dm, q0, q0 + nq, from, from + BN) != TileKind::kSkip) break;
  return from;
}


template <class T, int D>
__global__ void __launch_bounds__(Config<T, D>::kThreads, 1)
    block_attention_fwd_sm90_kernel(const __grid_constant__ KernelParams<T, D> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Config<T, D>;
  using Pipeline = cutlass::PipelineTmaAsync<C::kStages>;
  constexpr int kBM = C::kBM, kBN = C::kBN;
  extern __shared__ char smem_raw[];
  SharedStorage<T, D>& ss = aligned_shared_storage<SharedStorage<T, D>>(smem_raw);

  const int seq = blockIdx.x / p.q_tiles;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % p.q_tiles) * kBM;
  const int h = blockIdx.y;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t cq = p.cu_seqlens_q[seq], ck = p.cu_seqlens_k[seq];
  const DocMask dm{p.mask, p.block_size, p.cu_seqlens_q[seq + 1] - cq, p.cu_seqlens_k[seq + 1] - ck};
  if (q0 >= dm.len_q) return;  // the whole CTA, before any barrier
  const int64_t nq = min_i64(kBM, dm.len_q - q0);
  const RowRange keys = key_range(dm, q0, q0 + nq);
  const int64_t first_tile = next_kept_tile<kBN>(dm, q0, nq, keys, (keys.begin / kBN) * kBN);

  Pipeline pipeline = make_tma_ring<Pipeline>(ss.pipeline, ss.q_full, 2 * C::kTileBytes, C::kConsumerThreads);

  if (threadIdx.x < 128) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x != 0) return;
    prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename C::SmemQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename C::SmemKV{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename C::SmemKV{});
    // Coordinates of this head's rows of the document, tiled: gQ (BM, D), gK / gV (BN, D, tile).
    Tensor mQ = domain_offset(make_coord(static_cast<int32_t>(cq), _0{}),
                              p.tma_q.get_tma_tensor(make_shape(p.total_q, Int<D>{}, p.heads_q))(_, _, h));
    Tensor mK = domain_offset(make_coord(static_cast<int32_t>(ck), _0{}),
                              p.tma_k.get_tma_tensor(make_shape(p.total_k, Int<D>{}, p.heads_kv))(_, _, hk));
    Tensor mV = domain_offset(make_coord(static_cast<int32_t>(ck), _0{}),
                              p.tma_v.get_tma_tensor(make_shape(p.total_k, Int<D>{}, p.heads_kv))(_, _, hk));
    Tensor gQ = local_tile(mQ, Shape<Int<kBM>, Int<D>>{}, make_coord(static_cast<int32_t>(q0 / kBM), _0{}));
    Tensor gK = local_tile(mK, Shape<Int<kBN>, Int<D>>{}, make_coord(_, _0{}));
    Tensor gV = local_tile(mV, Shape<Int<kBN>, Int<D>>{}, make_coord(_, _0{}));
    auto [tQgQ, tQsQ] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tKgK, tKsK] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVgV, tVsV] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

    using Barrier = cutlass::arch::ClusterTransactionBarrier::ValueType;
    ss.q_full.arrive_and_expect_tx(C::kQBytes);
    copy(p.tma_q.with(reinterpret_cast<Barrier&>(ss.q_full)), tQgQ, tQsQ);
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int64_t k0 = first_tile; k0 < keys.end; k0 = next_kept_tile<kBN>(dm, q0, nq, keys, k0 + kBN)) {
      pipeline.producer_acquire(write);
      const int tile = static_cast<int>(k0 / kBN);
      copy(p.tma_k.with(*pipeline.producer_get_barrier(write)), tKgK(_, tile), tKsK(_, write.index()));
      copy(p.tma_v.with(*pipeline.producer_get_barrier(write)), tVgV(_, tile), tVsV(_, write.index()));
      ++write;
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  const int ct = threadIdx.x - 128;        // consumer thread
  const int wg = ct / 128;                 // consumer warpgroup: rows [64 wg, 64 wg + 64) of the tile
  const int64_t wg_q0 = q0 + wg * C::kRowsPerWarpgroup;
  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ct);
  auto thr_pv = mma_pv.get_thread_slice(ct);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename C::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename C::SmemKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename C::SmemVt{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);     // descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);     // descriptors (.., stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);    // descriptors (.., stage)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});  // fp32, 2 rows x BN / 4
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBM>, Int<D>>{});    // fp32, 2 rows x D / 4
  Tensor S = make_tensor(tSrS.data(), attention_sm90::acc_rowcol(tSrS.layout()));
  Tensor O = make_tensor(tOrO.data(), attention_sm90::acc_rowcol(tOrO.layout()));
  Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), attention_sm90::acc_rowcol(cS.layout()));
  Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{}));
  Tensor cO_rc = make_tensor(cO.data(), attention_sm90::acc_rowcol(cO.layout()));
  clear(tOrO);

  // This thread's two rows (tile-local) and the key ranges each sees, in document positions.
  int row[2];
  KeptKeys kept[2];
  CUTE_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    row[hh] = get<0>(cS_rc(hh, 0));
    kept[hh] = kept_keys(dm, q0 + row[hh]);
  }
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.0f, 0.0f};

  ss.q_full.wait(0);
  typename Pipeline::PipelineState read;
  for (int64_t k0 = first_tile; k0 < keys.end; k0 = next_kept_tile<kBN>(dm, q0, nq, keys, k0 + kBN)) {
    pipeline.consumer_wait(read);
    const int stage = read.index();
    const bool crosses_end = k0 + kBN > dm.len_k;  // the same for every consumer thread
    if (crosses_end) {
      // V rows past the document's end belong to the next document: both warpgroups zero them before any P V.
      const int valid = static_cast<int>(dm.len_k - k0);
      Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename C::SmemKV{});
      for (int idx = ct; idx < (kBN - valid) * D; idx += C::kConsumerThreads)
        sV(valid + idx / D, idx % D, stage) = T(0.0f);
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, 1);
    }
    const TileKind kind = classify_tile(dm, wg_q0, wg_q0 + C::kRowsPerWarpgroup, k0, k0 + kBN);
    if (kind != TileKind::kSkip) {
      warpgroup_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      if (kind == TileKind::kPartial || crosses_end) {
        CUTE_UNROLL
        for (int hh = 0; hh < 2; ++hh) {
          const int a0 = static_cast<int>(max_i64(kept[hh].a.begin - k0, -1));
          const int a1 = static_cast<int>(min_i64(kept[hh].a.end - k0, kBN));
          const int b0 = static_cast<int>(max_i64(kept[hh].b.begin - k0, -1));
          const int b1 = static_cast<int>(min_i64(kept[hh].b.end - k0, kBN));
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            const int j = get<1>(cS_rc(hh, c));
            const bool keep = (j >= a0 && j < a1) || (j >= b0 && j < b1);
            S(hh, c) = keep ? S(hh, c) * p.scale_log2 : kNegInf;
          }
        }
      } else {
        CUTE_UNROLL
        for (int i = 0; i < size(S); ++i) S(i) *= p.scale_log2;
      }

      float alpha[2];
      CUTE_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        float mx = kNegInf;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); ++c) mx = max_nan(mx, S(hh, c));
        const float m_new = max_nan(m_run[hh], quad_max(mx));
        alpha[hh] = m_run[hh] == kNegInf ? 0.0f : exp2f(m_run[hh] - m_new);
        float sum = 0.0f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); ++c) {
          const float pr = S(hh, c) == kNegInf ? 0.0f : exp2f(S(hh, c) - m_new);
          S(hh, c) = pr;
          sum += pr;
        }
        l_run[hh] = l_run[hh] * alpha[hh] + quad_sum(sum);
        m_run[hh] = m_new;
      }
      CUTE_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O); ++c) O(hh, c) *= alpha[hh];
      }
      Tensor rP = make_tensor_like<T>(tSrS);
      CUTE_UNROLL
      for (int i = 0; i < size(rP); ++i) rP(i) = T(tSrS(i));
      Tensor tOrP = make_tensor(rP.data(), attention_sm90::acc_as_a_operand(rP.layout()));
      warpgroup_fence_operand(tOrP);
      warpgroup_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
    }
    pipeline.consumer_release(read);
    ++read;
  }

  // Epilogue: rows of this document only.
  const int64_t hq = p.heads_q;
  CUTE_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    if (row[hh] >= nq) continue;
    const int64_t t = cq + q0 + row[hh];
    const float inv_l = row_out_scale(m_run[hh], l_run[hh]);
    if (ct % 4 == 0) p.lse[t * hq + h] = row_lse(m_run[hh], log2f(l_run[hh])) * kLn2;
    T* out = p.out + (t * hq + h) * D;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(O); c += 2) {
      cutlass::Array<T, 2> pair;
      pair[0] = T(row_out(O(hh, c), inv_l));
      pair[1] = T(row_out(O(hh, c + 1), inv_l));
      *reinterpret_cast<cutlass::Array<T, 2>*>(out + get<1>(cO_rc(hh, c))) = pair;
    }
  }
#endif
}

template <class T, int D>
Status launch(const BlockAttentionParams& p, cudaStream_t stream) {
  using C = Config<T, D>;
  const int64_t q_tiles = (p.max_seqlen_q + C::kBM - 1) / C::kBM;
  if (q_tiles == 0 || p.num_seqs == 0 || p.heads_q == 0) return Status::kOk;
  if (q_tiles * p.num_seqs > INT32_MAX || p.heads_q > 65535 || p.total_q > INT32_MAX || p.total_k > INT32_MAX)
    return Status::kBadArgument;
  auto kernel = block_attention_fwd_sm90_kernel<T, D>;
  cudaFuncAttributes attributes;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.binaryVersion != 90) return Status::kNotCompiled;  // no sm_90a code for this device
  KernelParams<T, D> k;
  k.tma_q = make_tma_q<T, D>(p.q, p.total_q, p.q_row_stride, p.heads_q, p.q_head_stride);
  k.tma_k = make_tma_kv<T, D>(p.k, p.total_k, p.k_row_stride, p.heads_kv, p.k_head_stride);
  k.tma_v = make_tma_kv<T, D>(p.v, p.total_k, p.v_row_stride, p.heads_kv, p.v_head_stride);
  k.total_q = static_cast<int32_t>(p.total_q);
  k.total_k = static_cast<int32_t>(p.total_k);
  k.cu_seqlens_q = p.cu_seqlens_q;
  k.cu_seqlens_k = p.cu_seqlens_k;
  k.heads_q = static_cast<int32_t>(p.heads_q);
  k.heads_kv = static_cast<int32_t>(p.heads_kv);
  k.q_tiles = static_cast<int32_t>(q_tiles);
  k.mask = p.mask;
  k.block_size = p.block_size;
  k.scale_log2 = p.softmax_scale * kLog2e;
  k.out = static_cast<T*>(p.out);
  k.lse = p.lse;
  const size_t smem = kSmemBytes<T, D>;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(q_tiles * p.num_seqs), static_cast<unsigned>(p.heads_q));
  kernel<<<grid, C::kThreads, smem, stream>>>(k);
  LLADA_RETURN_LAUNCH_STATUS();
}

template <class T>
Status dispatch_head_dim(const BlockAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return Status::kBadArgument;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool block_attention_fwd_sm90_supported(const BlockAttentionParams& p) {
  const bool dtype_ok = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16;
  const bool dim_ok = p.head_dim == 64 || p.head_dim == 128;
  constexpr int64_t kVec = 8;  // 16 bytes of a 16-bit dtype: TMA strides and bases
  const bool strides_ok = p.q_row_stride % kVec == 0 && p.q_head_stride % kVec == 0 && p.k_row_stride % kVec == 0 &&
                          p.k_head_stride % kVec == 0 && p.v_row_stride % kVec == 0 && p.v_head_stride % kVec == 0;
  const bool bases_ok = aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
  return dtype_ok && dim_ok && strides_ok && bases_ok && p.total_q > 0 && p.total_k > 0 && p.block_size >= 1 &&
         p.heads_kv >= 1 && p.heads_q % p.heads_kv == 0;
}

Status block_attention_fwd_sm90(const BlockAttentionParams& p, cudaStream_t stream) {
  if (!block_attention_fwd_sm90_supported(p)) return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace llada
