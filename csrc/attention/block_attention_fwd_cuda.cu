// CUDA forward of block attention (DESIGN.md §3.1) on CuTe: a FlashAttention-2-style kernel for sm_80
// and sm_90 (SM80 bf16/fp16 tensor-core MMA, fp32 accumulation), bf16/fp16, D in {64, 128}.
//
// One thread block (4 warps) is one (sequence, query tile of 64 rows, query head). It walks the key
// tiles of its sequence with the shared tile classification (attention/block_mask.h): tiles the mask
// removes are skipped, full tiles are computed without evaluating the mask. Per key tile:
//   S = Q K^T on tensor cores -> masked, scaled scores in shared memory -> online softmax by rows
//   (2 threads a row) -> P (bf16/fp16) in shared memory -> O = alpha O + P V on tensor cores.
// Correctness first: plain global->shared loads and shared-memory softmax; cp.async pipelining,
// swizzled layouts, register-resident softmax and the Hopper (wgmma + TMA) path are left for tuning.
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <limits>

#include "attention/block_mask.h"
#include "common/cuda_check.h"
#include "llada/attention.h"

namespace llada {
namespace {

using namespace cute;

constexpr int kBQ = 64;       // query rows per block
constexpr int kBK = 64;       // keys per tile
constexpr int kThreads = 128;  // 4 warps, each 16 query rows of the MMA
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class T>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};

template <class T, int D>
struct Smem {
  T q[kBQ * D];      // [BQ, D]
  T k[kBK * D];      // [BK, D]
  T v[kBK * D];      // [BK, D]
  T p[kBQ * kBK];    // [BQ, BK] probabilities
  float s[kBQ * kBK];  // [BQ, BK] scores in log2 units, -inf where masked
  float alpha[kBQ];  // rescale of each output row for the current tile
  float l[kBQ];      // final row sums
};

// dst [n_rows, D] row-major in shared memory = rows [0, n_valid) of src (row stride in elements), zeros after.
template <class T, int D>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t row_stride, int n_valid, int n_rows) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = row_stride % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    for (int idx = threadIdx.x; idx < n_rows * (D / kVec); idx += kThreads) {
      const int r = idx / (D / kVec), c = (idx % (D / kVec)) * kVec;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < n_valid) val = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * D + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < n_rows * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      dst[idx] = r < n_valid ? src[r * row_stride + c] : T(0.0f);
    }
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) block_attention_fwd_kernel(const BlockAttentionParams p, int q_tiles) {
  extern __shared__ __align__(16) char smem_raw[];
  Smem<T, D>& sm = *reinterpret_cast<Smem<T, D>*>(smem_raw);

  const int64_t seq = blockIdx.x / q_tiles;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % q_tiles) * kBQ;
  const int64_t h = blockIdx.y;
  const int64_t cq = p.cu_seqlens_q[seq], ck = p.cu_seqlens_k[seq];
  const DocMask dm{p.mask, p.block_size, p.cu_seqlens_q[seq + 1] - cq, p.cu_seqlens_k[seq + 1] - ck};
  if (q0 >= dm.len_q) return;
  const int nq = static_cast<int>(min_i64(kBQ, dm.len_q - q0));
  const int64_t hk = h / (p.heads_q / p.heads_kv);

  const T* q = static_cast<const T*>(p.q) + (cq + q0) * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + ck * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + ck * p.v_row_stride + hk * p.v_head_stride;
  load_rows<T, D>(sm.q, q, p.q_row_stride, nq, kBQ);

  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<T>::type>, Layout<Shape<_4, _1, _1>>>;
  TiledMma mma;
  auto thr = mma.get_slice(threadIdx.x);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), make_layout(make_shape(Int<kBQ>{}, Int<D>{}), LayoutRight{}));
  Tensor sK = make_tensor(make_smem_ptr(sm.k), make_layout(make_shape(Int<kBK>{}, Int<D>{}), LayoutRight{}));
  Tensor sP = make_tensor(make_smem_ptr(sm.p), make_layout(make_shape(Int<kBQ>{}, Int<kBK>{}), LayoutRight{}));
  // V [BK, D] read as the (n = D, k = BK) operand of O = P V.
  Tensor sVt = make_tensor(make_smem_ptr(sm.v), make_layout(make_shape(Int<D>{}, Int<kBK>{}),
                                                            make_stride(Int<1>{}, Int<D>{})));
  Tensor tSsQ = thr.partition_A(sQ);
  Tensor tSrQ = thr.partition_fragment_A(sQ);
  Tensor tSsK = thr.partition_B(sK);
  Tensor tSrK = thr.partition_fragment_B(sK);
  Tensor tOsP = thr.partition_A(sP);
  Tensor tOrP = thr.partition_fragment_A(sP);
  Tensor tOsV = thr.partition_B(sVt);
  Tensor tOrV = thr.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(mma, Shape<Int<kBQ>, Int<kBK>>{});  // fp32
  Tensor tOrO = partition_fragment_C(mma, Shape<Int<kBQ>, Int<D>>{});    // fp32
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<kBK>>{}));
  Tensor tOcO = thr.partition_C(make_identity_tensor(Shape<Int<kBQ>, Int<D>>{}));
  clear(tOrO);

  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row = threadIdx.x / 2;          // softmax: threads 2r and 2r + 1 own row r,
  const int col0 = (threadIdx.x % 2) * (kBK / 2);  // half of its columns each
  float m_run = kNegInf, l_run = 0.0f;

  const RowRange keys = key_range(dm, q0, q0 + nq);
  for (int64_t k0 = (keys.begin / kBK) * kBK; k0 < keys.end; k0 += kBK) {
    const int nk = static_cast<int>(min_i64(kBK, dm.len_k - k0));
    const TileKind kind = classify_tile(dm, q0, q0 + nq, k0, k0 + nk);
    if (kind == TileKind::kSkip) continue;
    __syncthreads();  // the previous tile is consumed
    load_rows<T, D>(sm.k, k + k0 * p.k_row_stride, p.k_row_stride, nk, kBK);
    load_rows<T, D>(sm.v, v + k0 * p.v_row_stride, p.v_row_stride, nk, kBK);
    __syncthreads();

    clear(tSrS);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      copy(tSsQ(_, _, kb), tSrQ(_, _, kb));
      copy(tSsK(_, _, kb), tSrK(_, _, kb));
      gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int r = get<0>(tScS(i)), j = get<1>(tScS(i));
      const bool keep = r < nq && j < nk && (kind == TileKind::kFull || mask_keep(dm, q0 + r, k0 + j));
      sm.s[r * kBK + j] = keep ? tSrS(i) * scale_log2 : kNegInf;
    }
    __syncthreads();

    const float* srow = sm.s + row * kBK + col0;
    float mx = kNegInf;
    for (int c = 0; c < kBK / 2; ++c) mx = fmaxf(mx, srow[c]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);
    const float alpha = m_run == kNegInf ? 0.0f : exp2f(m_run - m_new);
    float sum = 0.0f;
    for (int c = 0; c < kBK / 2; ++c) {
      const float pr = srow[c] == kNegInf ? 0.0f : exp2f(srow[c] - m_new);
      sm.p[row * kBK + col0 + c] = T(pr);
      sum += pr;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    if (col0 == 0) sm.alpha[row] = alpha;
    __syncthreads();

    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= sm.alpha[get<0>(tOcO(i))];
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      copy(tOsP(_, _, kb), tOrP(_, _, kb));
      copy(tOsV(_, _, kb), tOrV(_, _, kb));
      gemm(mma, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
    }
  }

  if (col0 == 0) {
    sm.l[row] = l_run;
    if (row < nq) p.lse[(cq + q0 + row) * p.heads_q + h] = l_run > 0.0f ? (m_run + log2f(l_run)) * kLn2 : kNegInf;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + ((cq + q0) * p.heads_q + h) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int r = get<0>(tOcO(i)), d = get<1>(tOcO(i));
    const float l = sm.l[r];
    if (r < nq) out[static_cast<int64_t>(r) * p.heads_q * D + d] = T(l > 0.0f ? tOrO(i) / l : 0.0f);
  }
}

template <class T, int D>
Status launch(const BlockAttentionParams& p, cudaStream_t stream) {
  const int64_t q_tiles = (p.max_seqlen_q + kBQ - 1) / kBQ;
  if (q_tiles == 0 || p.num_seqs == 0 || p.heads_q == 0) return Status::kOk;
  if (q_tiles * p.num_seqs > INT32_MAX || p.heads_q > 65535) return Status::kBadArgument;
  const dim3 grid(static_cast<unsigned>(q_tiles * p.num_seqs), static_cast<unsigned>(p.heads_q));
  const size_t smem = sizeof(Smem<T, D>);
  auto kernel = block_attention_fwd_kernel<T, D>;
  LLADA_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(p, static_cast<int>(q_tiles));
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

}  // namespace

Status block_attention_fwd_cuda(const BlockAttentionParams& p, cudaStream_t stream) {
  if (p.block_size < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::kFloat16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    default: return Status::kBadArgument;
  }
}

}  // namespace llada
