// C++ CPU kernels of `moe_permute`, `moe_unpermute` and its backward (docs/ARCHITECTURE.md, Mixture of experts).
//
// Permute is a stable counting sort of the flattened (token, slot) ids by expert: a serial histogram
// and scan over the T * k ids (cheap), then the row copies in parallel. Unpermute gathers each
// token's k rows and sums them weighted, in fp32, one token per OpenMP iteration.
#include <cstdint>
#include <cstring>
#include <vector>

#include "llada/moe.h"
#include "moe/element.h"

namespace llada {

namespace {

template <typename T>
void copy_rows(const MoePermuteParams& p) {
  const T* x = static_cast<const T*>(p.x);  // [T, H]
  T* out = static_cast<T*>(p.x_sorted);     // [M, H]
  const int64_t M = p.tokens * p.top_k, H = p.hidden;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i)
    std::memcpy(out + static_cast<int64_t>(p.inverse[i]) * H, x + (i / p.top_k) * H, sizeof(T) * H);
}

template <typename T>
void unpermute(const MoeUnpermuteParams& p) {
  const T* y = static_cast<const T*>(p.y);  // [M, H]
  T* out = static_cast<T*>(p.out);          // [T, H]
  const int64_t H = p.hidden, k = p.top_k;
#pragma omp parallel
  {
    std::vector<float> acc(H);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < k; ++s) {
        const T* row = y + static_cast<int64_t>(p.inverse[t * k + s]) * H;
        const float w = p.topk_weights[t * k + s];
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[h] += w * moe::to_float(row[h]);
      }
      T* dst = out + t * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) dst[h] = moe::from_float<T>(acc[h]);
    }
  }
}

template <typename T>
void unpermute_backward(const MoeUnpermuteBackwardParams& p) {
  const T* dout = static_cast<const T*>(p.grad_out);  // [T, H]
  const T* y = static_cast<const T*>(p.y);            // [M, H]
  T* dy = static_cast<T*>(p.grad_y);                  // [M, H]
  const int64_t H = p.hidden, k = p.top_k, TK = p.tokens * k;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < TK; ++i) {
    const T* g = dout + (i / k) * H;
    const T* row = y + static_cast<int64_t>(p.inverse[i]) * H;
    T* drow = dy + static_cast<int64_t>(p.inverse[i]) * H;
    const float w = p.topk_weights[i];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t h = 0; h < H; ++h) {
      const float gh = moe::to_float(g[h]);
      dot += gh * moe::to_float(row[h]);
      drow[h] = moe::from_float<T>(w * gh);
    }
    p.grad_weights[i] = dot;
  }
}

bool inverse_in_range(const int32_t* inverse, int64_t n, int64_t rows) {
  for (int64_t i = 0; i < n; ++i)
    if (inverse[i] < 0 || inverse[i] >= rows) return false;
  return true;
}

bool is_permutation(const int32_t* inverse, int64_t n) {
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (inverse[i] < 0 || inverse[i] >= n || seen[inverse[i]]) return false;
    seen[inverse[i]] = 1;
  }
  return true;
}

}  // namespace

Status moe_permute_cpu(const MoePermuteParams& p) {
  const int64_t E = p.experts, M = p.tokens * p.top_k;
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || E < 1 || M > INT32_MAX) return Status::kBadArgument;
  for (int64_t i = 0; i < M; ++i)
    if (p.topk_ids[i] < 0 || p.topk_ids[i] >= E) return Status::kBadArgument;
  std::vector<int32_t> cursor(E, 0);
  for (int64_t i = 0; i < M; ++i) ++cursor[p.topk_ids[i]];
  int32_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.offsets[e] = start;
    start += cursor[e];
    cursor[e] = p.offsets[e];
  }
  p.offsets[E] = start;
  for (int64_t i = 0; i < M; ++i) p.inverse[i] = cursor[p.topk_ids[i]]++;
  switch (p.dtype) {
    case DType::kFloat32: copy_rows<float>(p); break;
    case DType::kBFloat16: copy_rows<moe::Bf16>(p); break;
    default: return Status::kBadArgument;
  }
  return Status::kOk;
}

Status moe_unpermute_cpu(const MoeUnpermuteParams& p) {
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || p.rows < 0) return Status::kBadArgument;
  if (!inverse_in_range(p.inverse, p.tokens * p.top_k, p.rows)) return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kFloat32: unpermute<float>(p); break;
    case DType::kBFloat16: unpermute<moe::Bf16>(p); break;
    default: return Status::kBadArgument;
  }
  return Status::kOk;
}

Status moe_unpermute_backward_cpu(const MoeUnpermuteBackwardParams& p) {
  if (p.tokens < 0 || p.top_k < 1 || p.hidden < 0 || p.rows != p.tokens * p.top_k) return Status::kBadArgument;
  if (!is_permutation(p.inverse, p.rows)) return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kFloat32: unpermute_backward<float>(p); break;
    case DType::kBFloat16: unpermute_backward<moe::Bf16>(p); break;
    default: return Status::kBadArgument;
  }
  return Status::kOk;
}

}  // namespace llada
