// Pieces the Hopper kernels of block attention share (block_attention_fwd_sm90.cu, block_attention_bwd_sm90.cu):
// the TMA view of a packed varlen tensor, the set-up of a warp-specialised CTA (its shared storage, its TMA ring
// and its load-once barrier), and one warpgroup's GEMM over all K blocks on wgmma.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace llada {
namespace attention_sm90 {

using namespace cute;

// A packed [rows, heads, D] tensor as the TMA sees it: (rows, D, heads).
template <class T, int D>
auto packed_gmem(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return make_tensor(make_gmem_ptr(static_cast<const T*>(ptr)),
                     make_layout(make_shape(static_cast<int32_t>(rows), Int<D>{}, static_cast<int32_t>(heads)),
                                 make_stride(row_stride, _1{}, head_stride)));
}

// A TMA load of tiles of `smem` (one stage) from a packed [rows, heads, D] tensor.
template <class T, int D, class SmemLayout>
auto make_tma_load(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride,
                   SmemLayout smem) {
  return make_tma_copy(SM90_TMA_LOAD{}, packed_gmem<T, D>(ptr, rows, row_stride, heads, head_stride), smem);
}

// The CTA's shared storage at the first 1024-byte boundary of dynamic shared memory (what the 128-byte swizzle
// of TMA and wgmma tiles needs); the launch asks for sizeof(Storage) + 1024 bytes.
template <class Storage>
__device__ __forceinline__ Storage& aligned_shared_storage(char* raw) {
  return *reinterpret_cast<Storage*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
}

// A warp-specialised CTA's barriers: `once` (a transaction barrier for the tiles loaded once per CTA) and the TMA
// ring of `stage_bytes` per stage, produced by thread 0 of warpgroup 0 and consumed by the threads of the
// warpgroups after it. Every thread calls it; they all meet at __syncthreads before anyone waits on a barrier.
template <class Pipeline>
__device__ __forceinline__ Pipeline make_tma_ring(typename Pipeline::SharedStorage& storage,
                                                  cutlass::arch::ClusterTransactionBarrier& once,
                                                  uint32_t stage_bytes, uint32_t consumer_threads) {
  if (threadIdx.x == 0) {
    once.init(1);
    cutlass::arch::fence_barrier_init();
  }
  typename Pipeline::Params params;
  params.transaction_bytes = stage_bytes;
  params.role = threadIdx.x < 128 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  params.is_leader = threadIdx.x == 0;
  params.num_consumers = consumer_threads;
  Pipeline pipeline(storage, params, Shape<_1, _1, _1>{});
  __syncthreads();
  return pipeline;
}

// C (+)= A B over all K blocks by one warpgroup; A and B are wgmma operands (descriptors or registers).
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
}

}  // namespace attention_sm90
}  // namespace llada
