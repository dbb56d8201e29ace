// CUDA kernels of `moe_route`, `moe_permute`, `moe_unpermute`, its backward (docs/ARCHITECTURE.md, Mixture of experts).
// Asynchronous on the caller's stream, no host synchronisation.
//
//   route      one warp per token: the lanes write sigmoid scores and biased scores to shared memory,
//              then apply the shared gate rule (route_rule.h) split over the lanes: group top-2 and
//              each of the k picks reduced with shuffles through the rule's own merge functions, so
//              CPU and CUDA pick alike.
//   permute    a stable counting sort in three launches over chunks of kChunk (token, slot) entries:
//              per-chunk expert histograms; one block turning them into per-chunk bases and the
//              offsets; per-chunk ranks (warps in order, __match_any_sync within a warp); then the
//              row copies with 16-byte moves where the row allows.
//   unpermute  one block per token (forward) or per (token, slot) (backward), fp32 accumulation.
// Ids outside [0, E) cannot be reported without a host sync: they are counted nowhere, get
// inverse = -1, and unpermute skips them (the slot then contributes nothing).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "llada/moe.h"
#include "moe/route_rule.h"

namespace llada {
namespace {

constexpr int kRouteWarps = 4;
constexpr int kChunk = 256;  // (token, slot) entries per permute block, 8 warps
constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Shared memory of one routing warp, in floats: scores, biased scores, group scores, picks, kept flags.
__host__ __device__ inline int64_t route_warp_floats(const MoeRouteParams& p) {
  return 2 * p.experts + p.n_group + p.top_k + (p.n_group + 3) / 4;
}

template <typename T>
__global__ void route_kernel(MoeRouteParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= p.tokens) return;
  const int64_t E = p.experts;
  float* scores = smem + warp * route_warp_floats(p);  // [E]
  float* biased = scores + E;                          // [E]
  float* group_score = biased + E;                     // [n_group]
  int32_t* picked = reinterpret_cast<int32_t*>(group_score + p.n_group);  // [k]
  bool* kept = reinterpret_cast<bool*>(picked + p.top_k);                // [n_group]
  const T* logits = static_cast<const T*>(p.logits) + t * E;  // [E]
  for (int64_t e = lane; e < E; e += 32) {
    const float s = route_sigmoid(to_float(logits[e]));
    scores[e] = s;
    biased[e] = s + (p.expert_bias ? p.expert_bias[e] : 0.0f);
  }
  __syncwarp();
  int32_t* ids = p.topk_ids + t * p.top_k;  // [k]
  float* weights = p.topk_weights + t * p.top_k;
  const int64_t group_size = E / p.n_group;
  for (int64_t g = 0; g < p.n_group; ++g) {
    Top2 top = top2_empty();
    for (int64_t i = lane; i < group_size; i += 32) top = top2_push(top, biased[g * group_size + i]);
    for (int off = 16; off > 0; off >>= 1) {
      const Top2 other{__shfl_xor_sync(0xffffffffu, top.first, off), __shfl_xor_sync(0xffffffffu, top.second, off),
                       __shfl_xor_sync(0xffffffffu, top.count, off)};
      top = top2_merge(top, other);
    }
    if (lane == 0) group_score[g] = group_score_of(top);
  }
  __syncwarp();
  if (lane == 0) keep_groups(group_score, p.n_group, p.topk_group, kept);
  __syncwarp();
  Pick prev = pick_none();
  for (int64_t j = 0; j < p.top_k; ++j) {
    Pick best = best_after(biased, E, group_size, kept, prev, lane, 32);
    for (int off = 16; off > 0; off >>= 1) {
      const Pick other{__shfl_xor_sync(0xffffffffu, best.score, off),
                       static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(best.index), off))};
      if (pick_better(other, best)) best = other;
    }
    prev = best;
    if (lane == 0) picked[j] = static_cast<int32_t>(best.index);
  }
  __syncwarp();
  if (lane != 0) return;
  for (int64_t j = 0; j < p.top_k; ++j) ids[j] = picked[j];
  route_weights(scores, picked, p.top_k, p.routed_scaling_factor, p.norm_topk_prob, weights);
}

// counts [chunks, E]: how many entries of each chunk go to each expert.
__global__ void permute_count_kernel(const int32_t* ids, int64_t rows, int64_t E, int32_t* counts) {
  extern __shared__ int32_t hist[];  // [E]
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < rows) {
    const int32_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[blockIdx.x * E + e] = hist[e];
}

// One block: counts [chunks, E] -> the first row of each (chunk, expert) in x_sorted; offsets [E + 1].
__global__ void permute_scan_kernel(int32_t* counts, int64_t chunks, int64_t E, int32_t* offsets) {
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = counts[c * E + e];
      counts[c * E + e] = running;
      running += n;
    }
    offsets[e + 1] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
    for (int64_t c = 0; c < chunks; ++c) counts[c * E + e] += offsets[e];
}

// inverse[i] = base of (chunk, expert) + rank of i among the chunk's earlier entries of that expert.
__global__ void permute_rank_kernel(const int32_t* ids, int64_t rows, int64_t E, const int32_t* bases,
                                    int32_t* inverse) {
  extern __shared__ int32_t cursor[];  // [E]
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cursor[e] = bases[blockIdx.x * E + e];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  const int32_t e = i < rows ? ids[i] : -1;
  const bool valid = e >= 0 && e < E;
  for (int w = 0; w < kChunk / 32; ++w) {
    if (warp == w) {
      const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1 - lane);
      if (valid) {
        inverse[i] = cursor[e] + __popc(peers & ((1u << lane) - 1u));
      } else if (i < rows) {
        inverse[i] = -1;
      }
      __syncwarp();
      if (valid && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
    }
    __syncthreads();
  }
}

// x_sorted[inverse[i]] = x[i / k], in units of U (16, 4 or 2 bytes) per thread.
template <typename U>
__global__ void permute_copy_kernel(const U* x, const int32_t* inverse, int64_t rows, int64_t top_k,
                                    int64_t units, U* x_sorted) {
  const int64_t i = blockIdx.x;
  const int32_t r = inverse[i];
  if (r < 0) return;
  const U* src = x + (i / top_k) * units;
  U* dst = x_sorted + static_cast<int64_t>(r) * units;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = src[u];
}

template <typename T>
__global__ void unpermute_kernel(MoeUnpermuteParams p) {
  const int64_t t = blockIdx.x, H = p.hidden, k = p.top_k;
  const T* y = static_cast<const T*>(p.y);  // [M, H]
  T* out = static_cast<T*>(p.out) + t * H;  // [H]
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s < k; ++s) {
      const int32_t r = p.inverse[t * k + s];
      if (r >= 0 && r < p.rows) acc += p.topk_weights[t * k + s] * to_float(y[static_cast<int64_t>(r) * H + h]);
    }
    out[h] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void unpermute_backward_kernel(MoeUnpermuteBackwardParams p) {
  __shared__ float partial[kThreads / 32];
  const int64_t i = blockIdx.x, H = p.hidden;
  const int32_t r = p.inverse[i];
  const bool valid = r >= 0 && r < p.rows;
  const T* g = static_cast<const T*>(p.grad_out) + (i / p.top_k) * H;  // [H]
  const float w = p.topk_weights[i];
  float dot = 0.0f;
  if (valid) {
    const T* y = static_cast<const T*>(p.y) + static_cast<int64_t>(r) * H;
    T* dy = static_cast<T*>(p.grad_y) + static_cast<int64_t>(r) * H;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      const float gh = to_float(g[h]);
      dot += gh * to_float(y[h]);
      dy[h] = from_float<T>(w * gh);
    }
  }
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w8 = 0; w8 < kThreads / 32; ++w8) total += partial[w8];
    p.grad_weights[i] = total;
  }
}

size_t element_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <template <typename> class Launch, typename... Args>
Status dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: return Launch<float>::run(args...);
    case DType::kBFloat16: return Launch<__nv_bfloat16>::run(args...);
    case DType::kFloat16: return Launch<__half>::run(args...);
  }
  return Status::kBadArgument;
}

template <typename T>
struct RouteLaunch {
  static Status run(const MoeRouteParams& p, cudaStream_t stream) {
    const int64_t blocks = (p.tokens + kRouteWarps - 1) / kRouteWarps;
    const size_t smem = kRouteWarps * route_warp_floats(p) * sizeof(float);
    if (smem > 48 * 1024) return Status::kBadArgument;
    route_kernel<T><<<blocks, kRouteWarps * 32, smem, stream>>>(p);
    LLADA_RETURN_LAUNCH_STATUS();
  }
};

template <typename T>
struct UnpermuteLaunch {
  static Status run(const MoeUnpermuteParams& p, cudaStream_t stream) {
    unpermute_kernel<T><<<p.tokens, kThreads, 0, stream>>>(p);
    LLADA_RETURN_LAUNCH_STATUS();
  }
};

template <typename T>
struct UnpermuteBackwardLaunch {
  static Status run(const MoeUnpermuteBackwardParams& p, cudaStream_t stream) {
    unpermute_backward_kernel<T><<<p.tokens * p.top_k, kThreads, 0, stream>>>(p);
    LLADA_RETURN_LAUNCH_STATUS();
  }
};

}  // namespace

Status moe_route_cuda(const MoeRouteParams& p, cudaStream_t stream) {
  const int64_t E = p.experts;
  if (p.tokens < 0 || E < 1 || p.n_group < 1 || E % p.n_group != 0 || p.topk_group < 1 ||
      p.topk_group > p.n_group || p.top_k < 1 || p.top_k > p.topk_group * (E / p.n_group))
    return Status::kBadArgument;
  if (p.tokens == 0) return Status::kOk;
  return dispatch<RouteLaunch>(p.logits_dtype, p, stream);
}

Status moe_permute_cuda(const MoePermuteParams& p, cudaStream_t stream) {
  const int64_t E = p.experts, rows = p.tokens * p.top_k;
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || E < 1 || rows > INT32_MAX) return Status::kBadArgument;
  if (static_cast<size_t>(E) * sizeof(int32_t) > 48 * 1024) return Status::kBadArgument;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  if (chunks == 0) {
    LLADA_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.offsets, 0, (E + 1) * sizeof(int32_t), stream));
    return Status::kOk;
  }
  int32_t* counts = nullptr;  // [chunks, E]
  LLADA_RETURN_IF_CUDA_ERROR(cudaMallocAsync(&counts, chunks * E * sizeof(int32_t), stream));
  const size_t smem = E * sizeof(int32_t);
  permute_count_kernel<<<chunks, kChunk, smem, stream>>>(p.topk_ids, rows, E, counts);
  permute_scan_kernel<<<1, 1024, 0, stream>>>(counts, chunks, E, p.offsets);
  permute_rank_kernel<<<chunks, kChunk, smem, stream>>>(p.topk_ids, rows, E, counts, p.inverse);
  LLADA_RETURN_IF_CUDA_ERROR(cudaFreeAsync(counts, stream));
  const int64_t row_bytes = p.hidden * static_cast<int64_t>(element_size(p.dtype));
  if (row_bytes > 0) {
    if (row_bytes % 16 == 0) {
      permute_copy_kernel<uint4><<<rows, 128, 0, stream>>>(static_cast<const uint4*>(p.x), p.inverse, rows, p.top_k,
                                                           row_bytes / 16, static_cast<uint4*>(p.x_sorted));
    } else if (row_bytes % 4 == 0) {
      permute_copy_kernel<uint32_t><<<rows, 128, 0, stream>>>(static_cast<const uint32_t*>(p.x), p.inverse, rows,
                                                              p.top_k, row_bytes / 4,
                                                              static_cast<uint32_t*>(p.x_sorted));
    } else {
      permute_copy_kernel<uint16_t><<<rows, 128, 0, stream>>>(static_cast<const uint16_t*>(p.x), p.inverse, rows,
                                                              p.top_k, row_bytes / 2,
                                                              static_cast<uint16_t*>(p.x_sorted));
    }
  }
  LLADA_RETURN_LAUNCH_STATUS();
}

Status moe_unpermute_cuda(const MoeUnpermuteParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || p.rows < 0) return Status::kBadArgument;
  if (p.tokens == 0 || p.hidden == 0) return Status::kOk;
  return dispatch<UnpermuteLaunch>(p.dtype, p, stream);
}

Status moe_unpermute_backward_cuda(const MoeUnpermuteBackwardParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || p.rows != p.tokens * p.top_k) return Status::kBadArgument;
  if (p.tokens == 0) return Status::kOk;
  return dispatch<UnpermuteBackwardLaunch>(p.dtype, p, stream);
}

}  // namespace llada
