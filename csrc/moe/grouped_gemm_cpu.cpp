// C++ CPU grouped GEMM of the MoE layers (docs/ARCHITECTURE.md, Mixture of experts), all groups in one call:
//   forward  C[rows of g] = A[rows of g] @ B[g]^T       (B [E, N, K], K- or N-contiguous)
//   wgrad    dB[g] = dC[rows of g]^T @ A[rows of g]     (a ragged reduction over each group's rows)
//
// Both are one blocked kernel: a panel of kNR output columns is packed as fp32 [K, kNR] (so the
// weights are read once, converted once), then kMR x kNR tiles accumulate in registers over the whole
// reduction, broadcasting one scalar of the left operand per row and step. bf16 inputs are widened to
// fp32 (accumulation is always fp32) and results rounded once. Work items are (group, column panel),
// scheduled dynamically over the OpenMP threads. A forward group of at most kStreamRows rows (decoding:
// a few tokens per expert) skips the packing: each K-contiguous row of B is streamed once and dotted
// with the group's rows, so the pass runs at memory bandwidth. The kernels are compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at load time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/float_bits.h"
#include "common/host_device.h"
#include "llada/moe.h"
#include "moe/element.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LLADA_AVX512 1
#else
#define LLADA_AVX512 0
#endif

namespace llada {

namespace {

constexpr int64_t kMR = 8;          // rows of a register tile
constexpr int64_t kNR = 32;         // columns of a register tile and of a packed panel
constexpr int64_t kStreamRows = 16;  // forward groups up to this many rows stream B unpacked
constexpr int64_t kLanes = 16;       // K elements per step of the streaming kernel

// out[r, j] = sum_kk a[r * a_rs + kk * a_ks] * panel[kk, j] for r < mr, j < kNR.
LLADA_CPU_MULTIVERSION void tile_kernel(const float* a, int64_t a_rs, int64_t a_ks, int64_t mr, const float* panel,
                                    int64_t K, float* out) {
  float acc[kMR][kNR] = {};
  if (mr == kMR) {
    for (int64_t kk = 0; kk < K; ++kk) {
      const float* b = panel + kk * kNR;
      for (int64_t r = 0; r < kMR; ++r) {
        const float av = a[r * a_rs + kk * a_ks];
#pragma omp simd
        for (int64_t j = 0; j < kNR; ++j) acc[r][j] += av * b[j];
      }
    }
  } else {
    for (int64_t kk = 0; kk < K; ++kk) {
      const float* b = panel + kk * kNR;
      for (int64_t r = 0; r < mr; ++r) {
        const float av = a[r * a_rs + kk * a_ks];
#pragma omp simd
        for (int64_t j = 0; j < kNR; ++j) acc[r][j] += av * b[j];
      }
    }
  }
  for (int64_t r = 0; r < mr; ++r) std::memcpy(out + r * kNR, acc[r], sizeof(acc[r]));
}

// dst[0, kLanes) = src[0, kLanes) as fp32; bf16 widened by a shift so that the loop vectorises.
__attribute__((always_inline)) inline void load_lanes(const float* src, float* dst) {
  std::memcpy(dst, src, kLanes * sizeof(float));
}

__attribute__((always_inline)) inline void load_lanes(const moe::Bf16* src, float* dst) {
  uint16_t bits[kLanes];
  std::memcpy(bits, src, sizeof(bits));
  uint32_t wide[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) wide[l] = static_cast<uint32_t>(bits[l]) << 16;
  std::memcpy(dst, wide, sizeof(wide));
}

// out[r, j] = <a[r, :K], b[j * b_rs, :K]> for r < MR, j < nr: B rows streamed once, MR x kLanes
// accumulators in registers (MR is a template parameter so that the row loop unrolls).
template <int64_t MR, typename T>
__attribute__((always_inline)) inline void stream_rows(const float* a, const T* b, int64_t b_rs, int64_t nr,
                                                       int64_t K, float* out) {
  for (int64_t j = 0; j < nr; ++j) {
    const T* row = b + j * b_rs;
    float acc[MR][kLanes] = {};
    int64_t kk = 0;
    for (; kk + kLanes <= K; kk += kLanes) {
      float bv[kLanes];
      load_lanes(row + kk, bv);
      for (int64_t r = 0; r < MR; ++r) {
        const float* ar = a + r * K + kk;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += ar[l] * bv[l];
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) sum += acc[r][l];
      for (int64_t k2 = kk; k2 < K; ++k2) sum += a[r * K + k2] * moe::to_float(row[k2]);
      out[r * kNR + j] = sum;
    }
  }
}

// stream_rows<mr> for a run-time mr in [1, MR].
template <int64_t MR, typename T>
__attribute__((always_inline)) inline void stream_tile(const float* a, int64_t mr, const T* b, int64_t b_rs,
                                                       int64_t nr, int64_t K, float* out) {
  if constexpr (MR > 1) {
    if (mr < MR) return stream_tile<MR - 1>(a, mr, b, b_rs, nr, K, out);
  }
  stream_rows<MR>(a, b, b_rs, nr, K, out);
}

LLADA_CPU_MULTIVERSION void stream_tile_f32(const float* a, int64_t mr, const float* b, int64_t b_rs, int64_t nr,
                                        int64_t K, float* out) {
  stream_tile<kStreamRows>(a, mr, b, b_rs, nr, K, out);
}

LLADA_CPU_MULTIVERSION void stream_tile_bf16(const float* a, int64_t mr, const moe::Bf16* b, int64_t b_rs, int64_t nr,
                                         int64_t K, float* out) {
  stream_tile<kStreamRows>(a, mr, b, b_rs, nr, K, out);
}

#if LLADA_AVX512
// stream_rows for bf16 B with AVX-512 intrinsics: the compiler's own widening of 16 bf16 goes through
// the stack in two halves and stalls on store forwarding (2.5x slower than the fp32 stream).
template <int64_t MR>
__attribute__((target("avx512f,avx512bw"))) void stream_rows_bf16_avx512(const float* a, const moe::Bf16* b,
                                                                         int64_t b_rs, int64_t nr, int64_t K,
                                                                         float* out) {
  for (int64_t j = 0; j < nr; ++j) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(b + j * b_rs);
    __m512 acc[MR];
    for (int64_t r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + kLanes <= K; kk += kLanes) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kk));
      const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, bits);
      const __m512 bv = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, wide, 16));
      for (int64_t r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * K + kk), bv, acc[r]);
    }
    for (int64_t r = 0; r < MR; ++r) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t k2 = kk; k2 < K; ++k2) sum += a[r * K + k2] * bf16_bits_to_float(row[k2]);
      out[r * kNR + j] = sum;
    }
  }
}

// stream_rows_bf16_avx512<mr> for a run-time mr in [1, MR].
template <int64_t MR>
__attribute__((target("avx512f,avx512bw"))) void stream_tile_bf16_avx512(const float* a, int64_t mr,
                                                                         const moe::Bf16* b, int64_t b_rs,
                                                                         int64_t nr, int64_t K, float* out) {
  if constexpr (MR > 1) {
    if (mr < MR) return stream_tile_bf16_avx512<MR - 1>(a, mr, b, b_rs, nr, K, out);
  }
  stream_rows_bf16_avx512<MR>(a, b, b_rs, nr, K, out);
}
#endif

inline void stream_tile_any(const float* a, int64_t mr, const float* b, int64_t b_rs, int64_t nr, int64_t K,
                            float* out) {
  stream_tile_f32(a, mr, b, b_rs, nr, K, out);
}

inline void stream_tile_any(const float* a, int64_t mr, const moe::Bf16* b, int64_t b_rs, int64_t nr, int64_t K,
                            float* out) {
#if LLADA_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512) return stream_tile_bf16_avx512<kStreamRows>(a, mr, b, b_rs, nr, K, out);
#endif
  stream_tile_bf16(a, mr, b, b_rs, nr, K, out);
}

// Rows of the output tile to their destination (nr valid columns, row stride ld).
template <typename T>
void store_tile(const float* tile, int64_t mr, int64_t nr, T* dst, int64_t ld) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nr; ++j) dst[r * ld + j] = moe::from_float<T>(tile[r * kNR + j]);
}

// panel [K, kNR] = src[kk * s_k + j * s_j] for j < nr, zero for nr <= j < kNR.
template <typename T>
void pack_panel(const T* src, int64_t s_j, int64_t s_k, int64_t nr, int64_t K, float* panel) {
  if (s_k == 1) {
    for (int64_t kk = 0; kk < K; ++kk) std::fill(panel + kk * kNR + nr, panel + (kk + 1) * kNR, 0.0f);
    for (int64_t j = 0; j < nr; ++j) {
      const T* row = src + j * s_j;
      for (int64_t kk = 0; kk < K; ++kk) panel[kk * kNR + j] = moe::to_float(row[kk]);
    }
  } else {
    for (int64_t kk = 0; kk < K; ++kk) {
      const T* col = src + kk * s_k;
      float* dst = panel + kk * kNR;
      for (int64_t j = 0; j < nr; ++j) dst[j] = moe::to_float(col[j * s_j]);
      std::fill(dst + nr, dst + kNR, 0.0f);
    }
  }
}

// fp32 view of a contiguous [rows, cols] matrix: the matrix itself, or a widened copy in `storage`.
template <typename T>
const float* as_float(const void* src, int64_t count, std::vector<float>& storage) {
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<const float*>(src);
  } else {
    storage.resize(count);
    const T* s = static_cast<const T*>(src);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) storage[i] = moe::to_float(s[i]);
    return storage.data();
  }
}

template <typename T>
void grouped_gemm(const GroupedGemmParams& p) {
  const int64_t N = p.n, K = p.k, panels = (N + kNR - 1) / kNR;
  std::vector<float> a_storage;
  const float* a = as_float<T>(p.a, p.m * K, a_storage);  // [M, K]
  const T* b = static_cast<const T*>(p.b);                // [E, N, K] strided
  T* c = static_cast<T*>(p.c);                            // [M, N]
#pragma omp parallel
  {
    std::vector<float> panel(K * kNR), tile(std::max(kMR, kStreamRows) * kNR);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.groups * panels; ++item) {
      const int64_t g = item / panels, n0 = (item % panels) * kNR, nr = std::min(kNR, N - n0);
      const int64_t m_begin = p.offsets[g], m_end = p.offsets[g + 1];
      if (m_begin == m_end) continue;
      const T* bg = b + g * p.b_stride_group + n0 * p.b_stride_n;  // [nr, K]
      if (m_end - m_begin <= kStreamRows && p.b_stride_k == 1) {
        stream_tile_any(a + m_begin * K, m_end - m_begin, bg, p.b_stride_n, nr, K, tile.data());
        store_tile(tile.data(), m_end - m_begin, nr, c + m_begin * N + n0, N);
        continue;
      }
      pack_panel(bg, p.b_stride_n, p.b_stride_k, nr, K, panel.data());
      for (int64_t m = m_begin; m < m_end; m += kMR) {
        const int64_t mr = std::min(kMR, m_end - m);
        tile_kernel(a + m * K, K, 1, mr, panel.data(), K, tile.data());
        store_tile(tile.data(), mr, nr, c + m * N + n0, N);
      }
    }
  }
}

// Work items of the weight gradient. A group of many rows is cut along K: its A panel [rows, kNR] is
// packed once and reused down all N rows of dB[g]. A group of few rows (decoding) is cut along N: all
// of A[rows] is packed once per item and each item writes whole, contiguous rows of dB[g] (writing the
// gradient is what costs there). An empty group is one item that zero-fills dB[g].
constexpr int64_t kWgradFewRows = 64;
constexpr int64_t kWgradRowBlock = 64;

struct WgradItem {
  int64_t group;
  int64_t start;  // first K column (many rows) or first N row (few rows) of the item
  int kind;       // 0: empty group, 1: few rows, 2: many rows
};

template <typename T>
void grouped_gemm_wgrad(const GroupedGemmWgradParams& p) {
  const int64_t N = p.n, K = p.k, panels = (K + kNR - 1) / kNR;
  std::vector<float> dc_storage;
  const float* dc = as_float<T>(p.grad_c, p.m * N, dc_storage);  // [M, N]
  const T* a = static_cast<const T*>(p.a);                         // [M, K]
  T* db = static_cast<T*>(p.grad_b);                               // [E, N, K]
  std::vector<WgradItem> items;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t rows = p.offsets[g + 1] - p.offsets[g];
    if (rows == 0) {
      items.push_back({g, 0, 0});
    } else if (rows <= kWgradFewRows) {
      for (int64_t n = 0; n < N; n += kWgradRowBlock) items.push_back({g, n, 1});
    } else {
      for (int64_t k0 = 0; k0 < K; k0 += kNR) items.push_back({g, k0, 2});
    }
  }
#pragma omp parallel
  {
    std::vector<float> panel, tile(kMR * kNR);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      const WgradItem item = items[i];
      const int64_t g = item.group, m_begin = p.offsets[g], rows = p.offsets[g + 1] - m_begin;
      T* out = db + g * N * K;  // [N, K]
      if (item.kind == 0) {
        std::memset(static_cast<void*>(out), 0, sizeof(T) * N * K);  // +0.0 in fp32 and bf16
      } else if (item.kind == 1) {
        // panel [panels, rows, kNR]: every K panel of A[m_begin:m_end]; the reduction runs over the rows.
        panel.resize(panels * rows * kNR);
        for (int64_t q = 0; q < panels; ++q)
          pack_panel(a + m_begin * K + q * kNR, 1, K, std::min(kNR, K - q * kNR), rows, panel.data() + q * rows * kNR);
        const int64_t n_end = std::min(N, item.start + kWgradRowBlock);
        for (int64_t n = item.start; n < n_end; n += kMR) {
          const int64_t mr = std::min(kMR, n_end - n);
          for (int64_t q = 0; q < panels; ++q) {
            tile_kernel(dc + m_begin * N + n, 1, N, mr, panel.data() + q * rows * kNR, rows, tile.data());
            store_tile(tile.data(), mr, std::min(kNR, K - q * kNR), out + n * K + q * kNR, K);
          }
        }
      } else {
        // panel [rows, kNR] = A[m_begin:m_end, k0:k0 + kr], reused down all N rows.
        const int64_t k0 = item.start, kr = std::min(kNR, K - k0);
        panel.resize(rows * kNR);
        pack_panel(a + m_begin * K + k0, 1, K, kr, rows, panel.data());
        for (int64_t n = 0; n < N; n += kMR) {
          const int64_t mr = std::min(kMR, N - n);
          tile_kernel(dc + m_begin * N + n, 1, N, mr, panel.data(), rows, tile.data());
          store_tile(tile.data(), mr, kr, out + n * K + k0, K);
        }
      }
    }
  }
}

bool offsets_valid(const int32_t* offsets, int64_t groups, int64_t m) {
  if (offsets[0] != 0 || offsets[groups] != m) return false;
  for (int64_t g = 0; g < groups; ++g)
    if (offsets[g + 1] < offsets[g]) return false;
  return true;
}

}  // namespace

Status moe_grouped_gemm_cpu(const GroupedGemmParams& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.groups < 1 || !offsets_valid(p.offsets, p.groups, p.m))
    return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kFloat32: grouped_gemm<float>(p); break;
    case DType::kBFloat16: grouped_gemm<moe::Bf16>(p); break;
    default: return Status::kBadArgument;
  }
  return Status::kOk;
}

Status moe_grouped_gemm_wgrad_cpu(const GroupedGemmWgradParams& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.groups < 1 || !offsets_valid(p.offsets, p.groups, p.m))
    return Status::kBadArgument;
  switch (p.dtype) {
    case DType::kFloat32: grouped_gemm_wgrad<float>(p); break;
    case DType::kBFloat16: grouped_gemm_wgrad<moe::Bf16>(p); break;
    default: return Status::kBadArgument;
  }
  return Status::kOk;
}

}  // namespace llada
