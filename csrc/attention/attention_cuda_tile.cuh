// Pieces shared by the CUDA kernels of block attention (forward, decode form, backward; the Hopper kernels use
// the constants and the quad reductions): tile sizes, the SM80 tensor-core MMA atom per dtype, and global ->
// shared row loads from one or two row segments, synchronous or asynchronous (cp.async, sm_80+).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <limits>

#include "attention/doc_view.h"
#include "attention/softmax_rule.h"

namespace llada {
namespace attention_cuda {

constexpr int kBQ = 64;        // query rows per tile
constexpr int kBK = 64;        // keys per tile
constexpr int kThreads = 128;  // 4 warps, each 16 rows of the MMA
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kPad = 8;  // elements (16 bytes) added to a shared-memory row so that rows start in other banks

template <class T>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// Reductions over the 4 lanes that hold a row of an MMA accumulator (lanes 4i .. 4i + 3), SM80 and SM90 alike;
// the max is NaN when a lane's is (attention/softmax_rule.h).
__device__ __forceinline__ float quad_max(float x) {
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// dst [kRows, D] in shared memory, rows kPitch elements apart (a multiple of 8 elements) = rows
// j0 .. j0 + n_valid - 1 of src, zeros after. The aligned path issues all of a thread's 16-byte loads
// before its first store, so they are in flight together.
template <class T, int D, int kRows, int kPitch = D>
__device__ __forceinline__ void load_rows(T* dst, const Rows<T>& src, int64_t j0, int n_valid) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  constexpr int kIters = kRows * kPerRow / kThreads;
  static_assert(kRows * kPerRow % kThreads == 0, "whole rows per pass");
  if (src.aligned16(kVec)) {
    uint4 val[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = threadIdx.x + it * kThreads;
      const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
      val[it] = r < n_valid ? *reinterpret_cast<const uint4*>(src.row(j0 + r) + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = threadIdx.x + it * kThreads;
      *reinterpret_cast<uint4*>(dst + (idx / kPerRow) * kPitch + (idx % kPerRow) * kVec) = val[it];
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      dst[r * kPitch + c] = r < n_valid ? src.row(j0 + r)[c] : T(0.0f);
    }
  }
}

// cp.async of 16 bytes global -> shared; with valid false nothing is read and the 16 bytes become zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// As load_rows, as cp.async copies that complete with the thread's next committed group when `async`
// (src 16-byte aligned, n_valid >= 1); synchronously otherwise.
template <class T, int D, int kRows, int kPitch = D>
__device__ __forceinline__ void load_rows_async(T* dst, const Rows<T>& src, int64_t j0, int n_valid, bool async) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  static_assert(kPitch % kVec == 0, "16-byte aligned rows");
  if (!async) {
    load_rows<T, D, kRows, kPitch>(dst, src, j0, n_valid);
    return;
  }
#pragma unroll
  for (int it = 0; it < kRows * kPerRow / kThreads; ++it) {
    const int idx = threadIdx.x + it * kThreads;
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    const bool valid = r < n_valid;
    cp_async_16(dst + r * kPitch + c, (valid ? src.row(j0 + r) : src.row(j0)) + c, valid);
  }
}

}  // namespace attention_cuda
}  // namespace llada
