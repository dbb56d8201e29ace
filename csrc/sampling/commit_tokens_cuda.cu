// CUDA kernels of `commit_tokens` (docs/ARCHITECTURE.md, Token commit). Asynchronous, no host synchronisation, no
// allocation, so a decoding step that calls them can be captured in a CUDA graph.
//
// Two launches on the caller's stream (three when parameters differ per sequence):
//   1. propose: thread blocks over the rows of logits (B*L rows), writing candidates[row] and
//      confidence[row]. Greedy rows take one pass over V with 16-byte loads, four in flight per thread,
//      and an online max / sum-exp / argmax reduced through warp shuffles; each row is cut into chunks
//      by its vocabulary size alone (sampling/greedy_split.h), whose partial states the commit kernel merges.
//      With per-sequence parameters both propose kernels run over every row and each takes only the rows of
//      its kind (greedy or sampled), read from the device, so nothing waits for the host.
//      Sampled rows take one block per row and a few passes (the row
//      stays in L2): max, radix select of the top-k cut, radix select of the top-p cut on
//      fixed-point masses, then an inverse-CDF draw in vocabulary order, all in integer arithmetic
//      where a decision is made, so that the draw does not depend on the block size or on timing.
//   2. commit: one thread block per sequence (merges the chunks of its rows first, when split) applies the
//      shared commit rule (sampling/commit_rule.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/cuda_check.h"
#include "common/float_bits.h"
#include "common/philox.h"
#include "llada/sampling.h"
#include "sampling/commit_rule.h"
#include "sampling/greedy_split.h"
#include "sampling/sequence_sampling.h"

namespace llada {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Online softmax state of a slice of a row: running max, sum of exp(x - max), first argmax, NaN seen.
struct SoftmaxState {
  float max;
  float sum;
  int32_t arg;
  int32_t nan;
};

__device__ __forceinline__ SoftmaxState state_empty() {
  return SoftmaxState{-INFINITY, 0.0f, INT32_MAX, 0};
}

__device__ __forceinline__ void state_push(SoftmaxState& s, float x, int32_t i) {
  if (x > s.max) {
    s.sum = s.sum * exp2f((s.max - x) * kLog2e) + 1.0f;
    s.max = x;
    s.arg = i;
  } else if (s.max != -INFINITY) {
    s.sum += exp2f((x - s.max) * kLog2e);
  }
  s.nan |= (x != x);
}

// Pushes N consecutive entries, the first at index i0: one rescale per vector and N independent exps.
template <int N>
__device__ __forceinline__ void state_push_vec(SoftmaxState& s, const float (&x)[N], int32_t i0) {
  float m = x[0];
  int32_t a = 0;
  bool nan = x[0] != x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
    if (x[j] > m) {
      m = x[j];
      a = j;
    }
    nan |= x[j] != x[j];
  }
  s.nan |= nan;
  if (m > s.max) {
    s.sum = s.max == -INFINITY ? 0.0f : s.sum * exp2f((s.max - m) * kLog2e);
    s.max = m;
    s.arg = i0 + a;
  }
  if (s.max == -INFINITY) return;
  float add = 0.0f;
#pragma unroll
  for (int j = 0; j < N; ++j) add += exp2f((x[j] - s.max) * kLog2e);
  s.sum += add;
}

__device__ __forceinline__ SoftmaxState state_merge(SoftmaxState a, SoftmaxState b) {
  SoftmaxState r;
  r.max = fmaxf(a.max, b.max);
  const float wa = a.max == -INFINITY ? 0.0f : exp2f((a.max - r.max) * kLog2e);
  const float wb = b.max == -INFINITY ? 0.0f : exp2f((b.max - r.max) * kLog2e);
  r.sum = a.sum * wa + b.sum * wb;
  if (a.max > b.max) r.arg = a.arg;
  else if (b.max > a.max) r.arg = b.arg;
  else r.arg = min(a.arg, b.arg);
  r.nan = a.nan | b.nan;
  return r;
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState s) {
  for (int off = 16; off > 0; off >>= 1) {
    SoftmaxState o;
    o.max = __shfl_xor_sync(0xffffffffu, s.max, off);
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, off);
    o.arg = __shfl_xor_sync(0xffffffffu, s.arg, off);
    o.nan = __shfl_xor_sync(0xffffffffu, s.nan, off);
    s = state_merge(s, o);
  }
  return s;
}

__device__ SoftmaxState block_merge(SoftmaxState s, SoftmaxState* smem) {
  s = warp_merge(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = warp_merge(lane < kWarps ? smem[lane] : state_empty());
    if (lane == 0) smem[0] = s;
  }
  __syncthreads();
  s = smem[0];
  __syncthreads();
  return s;
}

// Calls f(x, index) for every element of a row once, 16-byte vector loads for the aligned body.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int32_t V, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int32_t head = static_cast<int32_t>(((16 - addr % 16) % 16) / sizeof(T));
  head = head < V ? head : V;
  for (int32_t i = threadIdx.x; i < head; i += kThreads) f(to_float(row[i]), i);
  const int32_t n_vec = (V - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int32_t v = threadIdx.x; v < n_vec; v += kThreads) {
    const uint4 raw = body[v];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f(to_float(e[j]), head + v * kVec + j);
  }
  for (int32_t i = head + n_vec * kVec + threadIdx.x; i < V; i += kThreads) f(to_float(row[i]), i);
}

__device__ __forceinline__ void write_row(const CommitTokensParams& p, int64_t row, int64_t token,
                                          float confidence) {
  p.candidates[row] = token;
  p.confidence[row] = p.tokens[row] == p.mask_id ? confidence : -INFINITY;
}

// An invalid row (NaN, or no finite maximum): token 0, confidence NaN (never committed), its sequence flagged.
__device__ __forceinline__ void write_invalid(const CommitTokensParams& p, int64_t row) {
  write_row(p, row, 0, NAN);
  if (p.invalid != nullptr) p.invalid[row / p.block] = true;
}

__device__ __forceinline__ void write_state(const CommitTokensParams& p, int64_t row, const SoftmaxState& s) {
  if (s.nan || !isfinite(s.max)) write_invalid(p, row);
  else write_row(p, row, s.arg, 1.0f / s.sum);
}

// Whether row `row` (= b * L + l) proposes greedily.
__device__ __forceinline__ bool row_is_greedy(const CommitTokensParams& p, int64_t row) {
  return is_greedy(sequence_sampling(p, row / p.block), p.vocab);
}

// Pushes row[begin, end) into this thread's state: 16-byte loads for the aligned body, kUnroll of them
// issued before the first is used.
template <typename T>
__device__ __forceinline__ void greedy_scan(const T* row, int32_t begin, int32_t end, SoftmaxState& s) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row + begin);
  int32_t head = static_cast<int32_t>(((16 - addr % 16) % 16) / sizeof(T));
  head = head < end - begin ? head : end - begin;
  for (int32_t i = begin + threadIdx.x; i < begin + head; i += kThreads) state_push(s, to_float(row[i]), i);
  const int32_t body_begin = begin + head;
  const int32_t n_vec = (end - body_begin) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(row + body_begin);
  const auto push = [&](const uint4& raw, int32_t v) {
    const T* e = reinterpret_cast<const T*>(&raw);
    float x[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = to_float(e[j]);
    state_push_vec(s, x, body_begin + v * kVec);
  };
  int32_t v = threadIdx.x;
  for (; v + (kUnroll - 1) * kThreads < n_vec; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = body[v + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) push(raw[u], v + u * kThreads);
  }
  for (; v < n_vec; v += kThreads) push(body[v], v);
  for (int32_t i = body_begin + n_vec * kVec + threadIdx.x; i < end; i += kThreads) state_push(s, to_float(row[i]), i);
}

// Grid (rows, splits): block (row, c) scans chunk c of the row. With one chunk it writes the row's
// proposal; otherwise its partial state goes to workspace[row * splits + c] for the commit kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) propose_greedy_kernel(CommitTokensParams p, int32_t splits,
                                                                   int32_t chunk) {
  __shared__ SoftmaxState smem[kWarps];
  const int64_t row = blockIdx.x;
  if (has_per_sequence(p) && !row_is_greedy(p, row)) return;  // propose_sampled_kernel's row
  const int32_t V = static_cast<int32_t>(p.vocab);
  const int32_t begin = static_cast<int32_t>(blockIdx.y) * chunk;
  const int32_t end = V - begin < chunk ? V : begin + chunk;
  const T* logits = static_cast<const T*>(p.logits) + row * p.vocab;
  SoftmaxState s = state_empty();
  greedy_scan(logits, begin, end, s);
  s = block_merge(s, smem);
  if (threadIdx.x != 0) return;
  if (splits == 1) write_state(p, row, s);
  else static_cast<SoftmaxState*>(p.workspace)[row * splits + blockIdx.y] = s;
}

// Fixed-point mass of a probability-like weight in [0, 1]; sums over any vocabulary below 2^24
// entries fit in 64 bits, and integer sums make every decision independent of the summation order.
__device__ __forceinline__ unsigned long long fixed_mass(float q) {
  return static_cast<unsigned long long>(q * 4294967296.0f + 0.5f);
}

template <typename T>
struct SampledRow {
  const T* logits;
  int32_t V;
  float temperature;

  __device__ __forceinline__ float z(float x) const { return temperature > 0.0f ? x / temperature : x; }
};

// Radix select over the order keys of z (kept: key >= lower_key). Returns the key of the k-th
// largest element when `by_mass` is false; when true, the key of the lowest element whose strictly
// greater kept mass is <= budget.
template <typename T>
__device__ uint32_t radix_select(const SampledRow<T>& r, float row_max, uint32_t lower_key, bool by_mass,
                                 unsigned long long k_or_budget, unsigned long long* hist) {
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above = 0;  // count or mass strictly above the current prefix group
  __shared__ uint32_t chosen_digit;
  __shared__ unsigned long long chosen_above;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
    __syncthreads();
    for_each_in_row(r.logits, r.V, [&](float x, int32_t) {
      const float zx = r.z(x);
      const uint32_t key = float_order_key(zx);
      if (key < lower_key || (key & prefix_mask) != prefix) return;
      const unsigned long long w = by_mass ? fixed_mass(exp2f((zx - row_max) * kLog2e)) : 1ull;
      atomicAdd(&hist[(key >> shift) & 0xFFu], w);
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long cum = above;
      uint32_t digit = 0;
      unsigned long long digit_above = above;
      for (int d = 255; d >= 0; --d) {
        if (hist[d] == 0) continue;
        if (by_mass) {
          if (cum > k_or_budget) break;
          digit = d;
          digit_above = cum;
          cum += hist[d];
        } else {
          digit = d;
          digit_above = cum;
          if (cum + hist[d] >= k_or_budget) break;
          cum += hist[d];
        }
      }
      chosen_digit = digit;
      chosen_above = digit_above;
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    prefix_mask |= 0xFFu << shift;
    above = chosen_above;
    __syncthreads();
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) propose_sampled_kernel(CommitTokensParams p) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  using ReduceF = cub::BlockReduce<float, kThreads>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ SoftmaxState smem[kWarps];
  __shared__ unsigned long long hist[256];
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ReduceF::TempStorage reduce_f;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ unsigned long long shared_total;
  __shared__ float shared_total_f;
  __shared__ int32_t shared_token;

  const int64_t row = blockIdx.x;
  if (has_per_sequence(p) && row_is_greedy(p, row)) return;  // propose_greedy_kernel's row
  const int64_t b = row / p.block;
  const SequenceSampling seq = sequence_sampling(p, b);
  const SampledRow<T> r{static_cast<const T*>(p.logits) + row * p.vocab, static_cast<int32_t>(p.vocab),
                        seq.temperature};

  SoftmaxState s = state_empty();
  for_each_in_row(r.logits, r.V, [&](float x, int32_t i) { state_push(s, r.z(x), i); });
  s = block_merge(s, smem);
  if (s.nan || !isfinite(s.max)) {
    if (threadIdx.x == 0) write_invalid(p, row);
    return;
  }
  const float m = s.max;

  uint32_t lower_key = 0;  // kept: order key >= lower_key
  if (seq.top_k > 0 && seq.top_k < p.vocab)
    lower_key = radix_select(r, m, 0u, false, static_cast<unsigned long long>(seq.top_k), hist);

  auto kept_mass = [&]() {
    unsigned long long local = 0;
    for_each_in_row(r.logits, r.V, [&](float x, int32_t) {
      const float zx = r.z(x);
      if (float_order_key(zx) >= lower_key) local += fixed_mass(exp2f((zx - m) * kLog2e));
    });
    const unsigned long long total = Reduce(tmp.reduce).Sum(local);
    if (threadIdx.x == 0) shared_total = total;
    __syncthreads();
    return shared_total;
  };

  if (seq.top_p < 1.0f) {
    const unsigned long long total = kept_mass();
    const auto budget = static_cast<unsigned long long>(static_cast<double>(seq.top_p) * total);
    lower_key = radix_select(r, m, lower_key, true, budget, hist);
  }

  float local_f = 0.0f;
  for_each_in_row(r.logits, r.V, [&](float x, int32_t) {
    const float zx = r.z(x);
    if (float_order_key(zx) >= lower_key) local_f += exp2f((zx - m) * kLog2e);
  });
  const float total_f = ReduceF(tmp.reduce_f).Sum(local_f);
  if (threadIdx.x == 0) shared_total_f = total_f;
  __syncthreads();

  int32_t token = s.arg;
  if (seq.temperature > 0.0f) {
    const unsigned long long total = kept_mass();
    const float u = commit_uniform(seq.seed, seq.offset, stream_row(p, b, row - b * p.block));
    const auto target = static_cast<unsigned long long>(static_cast<double>(u) * total);
    // Ordered scan: thread t owns kItems consecutive elements of each tile.
    constexpr int kItems = 8;
    if (threadIdx.x == 0) shared_token = -1;
    unsigned long long running = 0;
    int32_t last_kept = s.arg;
    for (int32_t tile = 0; tile < r.V; tile += kThreads * kItems) {
      const int32_t first = tile + threadIdx.x * kItems;
      unsigned long long mass[kItems];
      unsigned long long local = 0;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        mass[j] = 0;
        const int32_t i = first + j;
        if (i < r.V) {
          const float zx = r.z(to_float(r.logits[i]));
          if (float_order_key(zx) >= lower_key) {
            mass[j] = fixed_mass(exp2f((zx - m) * kLog2e));
            last_kept = i;
          }
        }
        local += mass[j];
      }
      unsigned long long excl, tile_total;
      Scan(tmp.scan).ExclusiveSum(local, excl, tile_total);
      const unsigned long long lo = running + excl;
      if (lo <= target && target < lo + local) {
        unsigned long long cum = lo;
        for (int j = 0; j < kItems; ++j) {
          cum += mass[j];
          if (mass[j] != 0 && cum > target) {
            shared_token = first + j;
            break;
          }
        }
      }
      running += tile_total;
      __syncthreads();
      if (shared_token >= 0) break;
    }
    // Rounding can leave the target at or past the total: take the last kept element.
    if (shared_token < 0) {
      __shared__ int32_t shared_last;
      if (threadIdx.x == 0) shared_last = -1;
      __syncthreads();
      atomicMax(&shared_last, last_kept);
      __syncthreads();
      token = shared_last;
    } else {
      token = shared_token;
    }
  }
  if (threadIdx.x == 0) {
    const float q = exp2f((r.z(to_float(r.logits[token])) - m) * kLog2e);
    write_row(p, row, token, q / shared_total_f);
  }
}

__global__ void commit_kernel(CommitTokensParams p, int32_t splits) {
  const int64_t b = blockIdx.x;
  const int64_t L = p.block;
  const SequenceSampling seq = sequence_sampling(p, b);
  if (splits > 1 && is_greedy(seq, p.vocab)) {  // the chunks of greedy rows
    const SoftmaxState* parts = static_cast<const SoftmaxState*>(p.workspace);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const int64_t row = b * L + i;
      SoftmaxState s = parts[row * splits];
      for (int32_t c = 1; c < splits; ++c) s = state_merge(s, parts[row * splits + c]);
      write_state(p, row, s);
    }
    __syncthreads();
  }
  const float* conf = p.confidence + b * L;
  const CommitCounts counts = commit_counts(conf, L, seq.threshold);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const bool commit = commit_decision(conf, L, i, counts, p.min_commit[b], seq.threshold);
    p.committed[b * L + i] = commit;
    if (commit) p.tokens[b * L + i] = p.candidates[b * L + i];
  }
}

// Which propose kernels run: the one of the call's scalars, or both when parameters differ per sequence
// (their values are on the device; each kernel takes its own rows).
bool scalars_greedy(const CommitTokensParams& p) {
  return is_greedy(SequenceSampling{p.threshold, p.temperature, p.top_k, p.top_p, p.seed, p.offset}, p.vocab);
}
bool any_greedy(const CommitTokensParams& p) { return has_per_sequence(p) || scalars_greedy(p); }
bool any_sampled(const CommitTokensParams& p) { return has_per_sequence(p) || !scalars_greedy(p); }

int32_t propose_splits(const CommitTokensParams& p) {
  return any_greedy(p) ? static_cast<int32_t>(greedy_splits(p.vocab)) : 1;
}

template <typename T>
void launch_propose(const CommitTokensParams& p, int32_t splits, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.batch * p.block);
  if (any_greedy(p)) {
    const dim3 grid(rows, static_cast<unsigned>(splits));
    const int32_t chunk = static_cast<int32_t>(greedy_chunk(p.vocab, splits));
    propose_greedy_kernel<T><<<grid, kThreads, 0, stream>>>(p, splits, chunk);
  }
  if (any_sampled(p)) propose_sampled_kernel<T><<<rows, kThreads, 0, stream>>>(p);
}

}  // namespace

int64_t commit_tokens_cuda_workspace_bytes(const CommitTokensParams& p) {
  const int32_t splits = propose_splits(p);
  return splits > 1 ? p.batch * p.block * splits * static_cast<int64_t>(sizeof(SoftmaxState)) : 0;
}

Status commit_tokens_cuda(const CommitTokensParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.block == 0) return Status::kOk;
  if (p.vocab >= (int64_t{1} << 24)) return Status::kBadArgument;
  const int32_t splits = propose_splits(p);
  if (splits > 1 && p.workspace == nullptr) return Status::kBadArgument;
  switch (p.logits_dtype) {
    case DType::kFloat32: launch_propose<float>(p, splits, stream); break;
    case DType::kBFloat16: launch_propose<__nv_bfloat16>(p, splits, stream); break;
    case DType::kFloat16: launch_propose<__half>(p, splits, stream); break;
  }
  LLADA_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  const int threads = p.block >= 1024 ? 1024 : static_cast<int>((p.block + 31) / 32 * 32);
  commit_kernel<<<static_cast<unsigned>(p.batch), threads, 0, stream>>>(p, splits);
  LLADA_RETURN_LAUNCH_STATUS();
}

}  // namespace llada
