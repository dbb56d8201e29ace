// Hopper backward (docs/ARCHITECTURE.md, Block attention) for sm_90a: the main kernel of the backward (the row
// deltas before it and the dq conversion after it are block_attention_bwd_cuda.cu's), TMA loads, wgmma, warp
// specialisation. bf16/fp16, D in {64, 128}, 16-byte aligned rows (block_attention_bwd_sm90_supported).
//
// One CTA is one (sequence, key tile of 128, kv head) and has three warpgroups:
//   producer     one thread loads K and V once, then, by TMA into a 2-stage mbarrier ring, Q and dO of every
//                (query head of the GQA group, query tile of 64 rows) that may see the keys (query_range and
//                classify_tile of attention/block_mask.h);
//   consumers    two warpgroups, 64 keys each. Per query tile:
//                  S^T = K Q^T, dP^T = V dO^T                 (wgmma, shared memory operands)
//                  P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - delta)   where the mask keeps (registers)
//                  dV += P^T dO, dK += dS^T Q                 (wgmma, P^T / dS^T from registers)
//                  dS^T to shared memory; dQ = dS K over the 128 keys, the warpgroups splitting D; fp32 atomics
//                then write scale dK and dV.
// Rows past a document's end (the next document's keys or queries, read by the tiles) are zeroed in shared
// memory before they are used, so nothing of another document reaches a gradient.
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
#include "common/cuda_check.h"

namespace llada {
namespace {

using namespace cute;
using attention_sm90::BwdConfig;
using attention_sm90::aligned_shared_storage;
using attention_sm90::make_tma_load;
using attention_sm90::make_tma_ring;
using attention_sm90::warpgroup_gemm;
using attention_cuda::kLn2;
using attention_cuda::kLog2e;
using attention_cuda::kNegInf;


template <class T, int D>
auto make_tma_q(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return make_tma_load<T, D>(ptr, rows, row_stride, heads, head_stride, take<0, 2>(typename BwdConfig<T, D>::SmemQ{}));
}

template <class T, int D>
auto make_tma_kv(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return make_tma_load<T, D>(ptr, rows, row_stride, heads, head_stride, typename BwdConfig<T, D>::SmemKV{});
}

template <class T, int D>
struct KernelParams {
  using TmaQ = decltype(make_tma_q<T, D>(nullptr, 1, D, 1, D));
  using TmaKV = decltype(make_tma_kv<T, D>(nullptr, 1, D, 1, D));
  TmaQ tma_q, tma_dout;
  TmaKV tma_k, tma_v;
  int32_t total_q, total_k;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int32_t heads_q, heads_kv;
  int32_t k_tiles;  // key tiles per sequence
  AttentionMask mask;
  int64_t block_size;
  float softmax_scale, scale_log2;
  const float* lse;    // [Tq, Hq], natural log
  const float* delta;  // [Tq, Hq]
  float* dq_accum;     // [Tq, Hq, D]
  T* dk;               // [Tk, Hkv, D] contiguous
  T* dv;
};

template <class T, int D>
struct SharedStorage {
  using C = BwdConfig<T, D>;
  cute::array_aligned<T, cosize_v<typename C::SmemKV>, 1024> k;
  cute::array_aligned<T, cosize_v<typename C::SmemKV>, 1024> v;
  cute::array_aligned<T, cosize_v<typename C::SmemQ>, 1024> q;
  cute::array_aligned<T, cosize_v<typename C::SmemQ>, 1024> dout;
  cute::array_aligned<T, cosize_v<typename C::SmemdSt>, 1024> ds;  // dS^T [BN, BM]
  float lse[C::kBM];    // of the current query tile, log2 units; -inf where a row sees no key or lies past the tile
  float delta[C::kBM];
  typename cutlass::PipelineTmaAsync<C::kStages>::SharedStorage pipeline;
  cutlass::arch::ClusterTransactionBarrier kv_full;
};

template <class T, int D>
constexpr size_t kSmemBytes = sizeof(SharedStorage<T, D>) + 1024;  // + alignment slack of the base


// Named barriers of the 256 consumer threads.
enum ConsumerBarrier : int { kZeroed = 1, kDsWritten = 2, kItemDone = 3 };

// A (query head of the GQA group, query tile) pair; g == group past the last one.
struct Item {
  int g;
  int64_t m0;
};

// The first pair from (g, m0) on whose query tile sees some of keys [n0, n0 + nk), in order.
template <int BM>
__device__ __forceinline__ Item next_item(const DocMask& dm, RowRange queries, int64_t n0, int64_t nk, int group,
                                          int g, int64_t m0) {
  const int64_t m_first = (queries.begin / BM) * BM;
  for (; g < group; ++g, m0 = m_first)
    for (; m0 < queries.end; m0 += BM)
      if (classify_tile(dm, m0, m0 + BM, n0, n0 + nk) != TileKind::kSkip) return Item{g, m0};
  return Item{group, 0};
}


// Rows [valid, rows) of a shared-memory tile (rows, D) set to zero by the 256 consumer threads (the caller
// then fences them for the tensor cores and meets the others at a barrier).
template <class T, int D, class Tile>
__device__ __forceinline__ void zero_rows_past(Tile&& tile, int rows, int valid, int ct) {
  for (int idx = ct; idx < (rows - valid) * D; idx += 256) tile(valid + idx / D, idx % D) = T(0.0f);
}

template <class T, int D>
__global__ void __launch_bounds__(BwdConfig<T, D>::kThreads, 1)
    block_attention_bwd_sm90_kernel(const __grid_constant__ KernelParams<T, D> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = BwdConfig<T, D>;
  using Pipeline = cutlass::PipelineTmaAsync<C::kStages>;
  constexpr int kBM = C::kBM, kBN = C::kBN;
  extern __shared__ char smem_raw[];
  SharedStorage<T, D>& ss = aligned_shared_storage<SharedStorage<T, D>>(smem_raw);

  const int seq = blockIdx.x / p.k_tiles;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % p.k_tiles) * kBN;
  const int hk = blockIdx.y;
  const int group = p.heads_q / p.heads_kv;
  const int64_t cq = p.cu_seqlens_q[seq], ck = p.cu_seqlens_k[seq];
  const DocMask dm{p.mask, p.block_size, p.cu_seqlens_q[seq + 1] - cq, p.cu_seqlens_k[seq + 1] - ck};
  if (n0 >= dm.len_k) return;  // the whole CTA, before any barrier
  const int64_t nk = min_i64(kBN, dm.len_k - n0);
  const RowRange queries = query_range(dm, n0, n0 + nk);
  const Item first = next_item<kBM>(dm, queries, n0, nk, group, 0, (queries.begin / kBM) * kBM);

  Pipeline pipeline = make_tma_ring<Pipeline>(ss.pipeline, ss.kv_full, 2 * C::kQBytes, C::kConsumerThreads);

  if (threadIdx.x < 128) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x != 0) return;
    prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_dout.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    using Barrier = cutlass::arch::ClusterTransactionBarrier::ValueType;
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename C::SmemKV{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename C::SmemKV{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename C::SmemQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename C::SmemQ{});
    const auto kv_tile = [&](const auto& tma) {  // this CTA's keys (or values) of kv head hk: (BN, D)
      Tensor m = tma.get_tma_tensor(make_shape(p.total_k, Int<D>{}, p.heads_kv))(_, _, hk);
      return local_tile(domain_offset(make_coord(static_cast<int32_t>(ck), _0{}), m), Shape<Int<kBN>, Int<D>>{},
                        make_coord(static_cast<int32_t>(n0 / kBN), _0{}));
    };
    auto [tKgK, tKsK] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(kv_tile(p.tma_k)));
    auto [tVgV, tVsV] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                      group_modes<0, 2>(kv_tile(p.tma_v)));
    ss.kv_full.arrive_and_expect_tx(2 * C::kKVBytes);
    copy(p.tma_k.with(reinterpret_cast<Barrier&>(ss.kv_full)), tKgK, tKsK);
    copy(p.tma_v.with(reinterpret_cast<Barrier&>(ss.kv_full)), tVgV, tVsV);

    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (Item it = first; it.g < group; it = next_item<kBM>(dm, queries, n0, nk, group, it.g, it.m0 + kBM)) {
      const int h = hk * group + it.g;
      const auto q_tile = [&](const auto& tma) {  // query rows [m0, m0 + BM) of head h: (BM, D)
        Tensor m = tma.get_tma_tensor(make_shape(p.total_q, Int<D>{}, p.heads_q))(_, _, h);
        return local_tile(domain_offset(make_coord(static_cast<int32_t>(cq), _0{}), m), Shape<Int<kBM>, Int<D>>{},
                          make_coord(static_cast<int32_t>(it.m0 / kBM), _0{}));
      };
      auto [tQgQ, tQsQ] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                        group_modes<0, 2>(q_tile(p.tma_q)));
      auto [tOgO, tOsO] = tma_partition(p.tma_dout, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                        group_modes<0, 2>(q_tile(p.tma_dout)));
      pipeline.producer_acquire(write);
      copy(p.tma_q.with(*pipeline.producer_get_barrier(write)), tQgQ, tQsQ(_, write.index()));
      copy(p.tma_dout.with(*pipeline.producer_get_barrier(write)), tOgO, tOsO(_, write.index()));
      ++write;
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<240>();
  const int ct = threadIdx.x - 128;  // consumer thread; warpgroup ct / 128 owns keys [64 (ct / 128), + 64)
  typename C::MmaSdP mma_sdp;
  typename C::MmaKV mma_kv;
  typename C::MmaQ mma_q;
  auto thr_sdp = mma_sdp.get_thread_slice(ct);
  auto thr_kv = mma_kv.get_thread_slice(ct);
  auto thr_q = mma_q.get_thread_slice(ct);
  // Operand descriptors depend on the warpgroup only: slicing by a warpgroup index the compiler knows to be
  // uniform keeps them in uniform registers.
  const int wg_first_thread = __shfl_sync(0xffffffffu, ct / 128, 0) * 128;
  auto wg_sdp = mma_sdp.get_thread_slice(wg_first_thread);
  auto wg_kv = mma_kv.get_thread_slice(wg_first_thread);
  auto wg_q = mma_q.get_thread_slice(wg_first_thread);
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename C::SmemKV{});      // (n, d)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename C::SmemKV{});      // (n, d)
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename C::SmemQ{});       // (m, d, stage)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename C::SmemQ{});   // (m, d, stage)
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename C::SmemQt{});     // (d, m, stage)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename C::SmemQt{}); // (d, m, stage)
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename C::SmemKt{});     // (d, n)
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename C::SmemdS{});    // (m, n)
  Tensor tSrK = wg_sdp.partition_fragment_A(sK);
  Tensor tSrV = wg_sdp.partition_fragment_A(sV);
  Tensor tSrQ = wg_sdp.partition_fragment_B(sQ);     // (.., stage)
  Tensor tSrdO = wg_sdp.partition_fragment_B(sdO);   // (.., stage)
  Tensor tKrdOt = wg_kv.partition_fragment_B(sdOt);  // (.., stage)
  Tensor tKrQt = wg_kv.partition_fragment_B(sQt);    // (.., stage)
  Tensor tQrdS = wg_q.partition_fragment_A(sdS);
  Tensor tQrKt = wg_q.partition_fragment_B(sKt);
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});   // S^T, then P^T (fp32)
  Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<Int<kBN>, Int<kBM>>{});  // dP^T, then dS^T (fp32)
  Tensor tKrdK = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<D>>{});
  Tensor tKrdV = partition_fragment_C(mma_kv, Shape<Int<kBN>, Int<D>>{});
  Tensor tQrdQ = partition_fragment_C(mma_q, Shape<Int<kBM>, Int<D>>{});
  Tensor S = make_tensor(tSrS.data(), attention_sm90::acc_rowcol(tSrS.layout()));    // (2 keys, BM / 4 queries)
  Tensor dP = make_tensor(tSrdP.data(), attention_sm90::acc_rowcol(tSrdP.layout()));
  Tensor cS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kBM>>{}));
  Tensor cS_rc = make_tensor(cS.data(), attention_sm90::acc_rowcol(cS.layout()));
  Tensor cKV = thr_kv.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<D>>{}));
  Tensor cQ = thr_q.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{}));
  Tensor cQ_rc = make_tensor(cQ.data(), attention_sm90::acc_rowcol(cQ.layout()));
  Tensor dQ = make_tensor(tQrdQ.data(), attention_sm90::acc_rowcol(tQrdQ.layout()));  // (2 rows, D / 8 columns)
  clear(tKrdK);
  clear(tKrdV);
  const int ds_col0 = get<1>(cS_rc(0, 0));  // this thread's first query column (even, < 8; then + c % 2 + 8 (c / 2))
  // This thread's two key rows (tile-local) and their mask coordinates, fixed for the CTA.
  const int len_q = static_cast<int>(dm.len_q), len_k = static_cast<int>(dm.len_k);
  const int bs = block_size32(dm.block_size);
  int key_n[2];
  MaskCoord32 key_c[2];
  CUTE_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    key_n[hh] = get<0>(cS_rc(hh, 0));
    key_c[hh] = key_coord32(dm.kind, static_cast<int>(n0) + key_n[hh], len_k, bs);
  }

  ss.kv_full.wait(0);
  if (nk < kBN) {  // the next document's keys: dQ = dS K
    zero_rows_past<T, D>(sK, kBN, static_cast<int>(nk), ct);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(256, kZeroed);
  }
  const int64_t hq = p.heads_q;
  typename Pipeline::PipelineState read;
  for (Item it = first; it.g < group; it = next_item<kBM>(dm, queries, n0, nk, group, it.g, it.m0 + kBM)) {
    pipeline.consumer_wait(read);
    const int stage = read.index();
    const int h = hk * group + it.g;
    const int64_t m0 = it.m0;
    const int nq = static_cast<int>(min_i64(kBM, dm.len_q - m0));
    const int64_t first_row = (cq + m0) * hq + h;  // of query m0 in lse / delta
    if (ct < kBM) ss.lse[ct] = ct < nq ? p.lse[first_row + ct * hq] * kLog2e : kNegInf;
    else if (ct < 2 * kBM) ss.delta[ct - kBM] = ct - kBM < nq ? p.delta[first_row + (ct - kBM) * hq] : 0.0f;
    if (nq < kBM) {  // the next document's queries and output gradients: dK = dS^T Q, dV = P^T dO
      zero_rows_past<T, D>(sQ(_, _, stage), kBM, nq, ct);
      zero_rows_past<T, D>(sdO(_, _, stage), kBM, nq, ct);
      cutlass::arch::fence_view_async_shared();
    }
    cutlass::arch::NamedBarrier::sync(256, kZeroed);
    const TileKind kind = classify_tile(dm, m0, m0 + nq, n0, n0 + nk);
    const bool masked = kind != TileKind::kFull || nq < kBM || nk < kBN;
    warpgroup_gemm<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
    warpgroup_gemm<true>(mma_sdp, tSrV, tSrdO(_, _, _, stage), tSrdP);

    CUTE_UNROLL
    for (int c = 0; c < size<1>(S); ++c) {
      const int m = get<1>(cS_rc(0, c));
      const float lse = ss.lse[m], delta = ss.delta[m];
      const MaskCoord32 query_c = query_coord32(dm.kind, static_cast<int>(m0) + m, len_q, len_k, bs);
      CUTE_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        const bool keep = lse != kNegInf && (!masked || (key_n[hh] < nk && keep32(dm.kind, query_c, key_c[hh])));
        const float pr = keep ? exp2f(S(hh, c) * p.scale_log2 - lse) : 0.0f;
        dP(hh, c) = keep ? pr * (dP(hh, c) - delta) : 0.0f;
        S(hh, c) = pr;
      }
    }
    // dV += P^T dO, then dK += dS^T Q, with P^T and dS^T as the A operands in registers.
    Tensor rP = make_tensor_like<T>(tSrS);
    CUTE_UNROLL
    for (int i = 0; i < size(rP); ++i) rP(i) = T(tSrS(i));
    Tensor tKrP = make_tensor(rP.data(), attention_sm90::acc_as_a_operand(rP.layout()));
    warpgroup_fence_operand(tKrP);
    warpgroup_gemm<false>(mma_kv, tKrP, tKrdOt(_, _, _, stage), tKrdV);
    Tensor rdS = make_tensor_like<T>(tSrdP);
    CUTE_UNROLL
    for (int i = 0; i < size(rdS); ++i) rdS(i) = T(tSrdP(i));
    Tensor tKrdS = make_tensor(rdS.data(), attention_sm90::acc_as_a_operand(rdS.layout()));
    warpgroup_fence_operand(tKrdS);
    warpgroup_gemm<false>(mma_kv, tKrdS, tKrQt(_, _, _, stage), tKrdK);

    // dS^T of this warpgroup's keys to shared memory (two adjacent columns per store, at C::dst_offset: plain
    // offsets keep the compiler from holding 32 swizzled addresses); then dQ = dS K over all keys, half of D each.
    Tensor dS_rc = make_tensor(rdS.data(), attention_sm90::acc_rowcol(rdS.layout()));
    CUTE_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dS_rc); c += 2) {
        cutlass::Array<T, 2> pair;
        pair[0] = dS_rc(hh, c);
        pair[1] = dS_rc(hh, c + 1);
        T* at = ss.ds.data() + C::dst_offset(key_n[hh], c / 2, ds_col0);
        *reinterpret_cast<cutlass::Array<T, 2>*>(at) = pair;
      }
    }
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(256, kDsWritten);
    warpgroup_gemm<true>(mma_q, tQrdS, tQrKt, tQrdQ);
    // Rows m and m + 8 of this thread, columns d0 + {0, 1} + 8 j: one base pointer, constant offsets.
    const int dq_m = get<0>(cQ_rc(0, 0)), dq_d = get<1>(cQ_rc(0, 0));
    float* dq = p.dq_accum + ((cq + m0 + dq_m) * hq + h) * D + dq_d;
    const int64_t dq_8_rows = 8 * hq * D;
    CUTE_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      if (dq_m + 8 * hh >= nq) continue;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dQ); ++c)
        atomicAdd(dq + hh * dq_8_rows + (c % 2) + 8 * (c / 2), p.softmax_scale * dQ(hh, c));
    }
    cutlass::arch::NamedBarrier::sync(256, kItemDone);  // dS^T and this stage read by both warpgroups
    pipeline.consumer_release(read);
    ++read;
  }

  const int64_t hkv = p.heads_kv;
  T* dk = p.dk + ((ck + n0) * hkv + hk) * D;
  T* dv = p.dv + ((ck + n0) * hkv + hk) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(tKrdK); ++i) {
    const int n = get<0>(cKV(i)), d = get<1>(cKV(i));
    if (n < nk) {
      const int64_t at = static_cast<int64_t>(n) * hkv * D + d;
      dk[at] = T(p.softmax_scale * tKrdK(i));
      dv[at] = T(tKrdV(i));
    }
  }
#endif
}

template <class T, int D>
Status launch(const BlockAttentionBwdParams& bp, const float* delta, float* dq_accum, cudaStream_t stream) {
  using C = BwdConfig<T, D>;
  const BlockAttentionParams& f = bp.fwd;
  const int64_t k_tiles = (f.max_seqlen_k + C::kBN - 1) / C::kBN;
  if (k_tiles == 0 || f.num_seqs == 0 || f.heads_kv == 0) return Status::kOk;
  if (k_tiles * f.num_seqs > INT32_MAX || f.heads_kv > 65535 || f.total_q > INT32_MAX || f.total_k > INT32_MAX)
    return Status::kBadArgument;
  auto kernel = block_attention_bwd_sm90_kernel<T, D>;
  cudaFuncAttributes attributes;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.binaryVersion != 90) return Status::kNotCompiled;  // no sm_90a code for this device
  KernelParams<T, D> k;
  k.tma_q = make_tma_q<T, D>(f.q, f.total_q, f.q_row_stride, f.heads_q, f.q_head_stride);
  k.tma_dout = make_tma_q<T, D>(bp.dout, f.total_q, f.heads_q * D, f.heads_q, D);
  k.tma_k = make_tma_kv<T, D>(f.k, f.total_k, f.k_row_stride, f.heads_kv, f.k_head_stride);
  k.tma_v = make_tma_kv<T, D>(f.v, f.total_k, f.v_row_stride, f.heads_kv, f.v_head_stride);
  k.total_q = static_cast<int32_t>(f.total_q);
  k.total_k = static_cast<int32_t>(f.total_k);
  k.cu_seqlens_q = f.cu_seqlens_q;
  k.cu_seqlens_k = f.cu_seqlens_k;
  k.heads_q = static_cast<int32_t>(f.heads_q);
  k.heads_kv = static_cast<int32_t>(f.heads_kv);
  k.k_tiles = static_cast<int32_t>(k_tiles);
  k.mask = f.mask;
  k.block_size = f.block_size;
  k.softmax_scale = f.softmax_scale;
  k.scale_log2 = f.softmax_scale * kLog2e;
  k.lse = f.lse;
  k.delta = delta;
  k.dq_accum = dq_accum;
  k.dk = static_cast<T*>(bp.dk);
  k.dv = static_cast<T*>(bp.dv);
  const size_t smem = kSmemBytes<T, D>;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(k_tiles * f.num_seqs), static_cast<unsigned>(f.heads_kv));
  kernel<<<grid, C::kThreads, smem, stream>>>(k);
  LLADA_RETURN_LAUNCH_STATUS();
}

template <class T>
Status dispatch_head_dim(const BlockAttentionBwdParams& p, const float* delta, float* dq_accum, cudaStream_t stream) {
  switch (p.fwd.head_dim) {
    case 64: return launch<T, 64>(p, delta, dq_accum, stream);
    case 128: return launch<T, 128>(p, delta, dq_accum, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace

bool block_attention_bwd_sm90_supported(const BlockAttentionBwdParams& p) {
  constexpr int64_t kVec = 8;  // 16 bytes of a 16-bit dtype: TMA strides and bases
  return block_attention_fwd_sm90_supported(p.fwd) && reinterpret_cast<uintptr_t>(p.dout) % 16 == 0 &&
         (p.fwd.heads_q * p.fwd.head_dim) % kVec == 0;
}

Status block_attention_bwd_sm90(const BlockAttentionBwdParams& p, const float* delta, float* dq_accum,
                                cudaStream_t stream) {
  if (!block_attention_bwd_sm90_supported(p)) return Status::kBadArgument;
  switch (p.fwd.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, delta, dq_accum, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, delta, dq_accum, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace llada
