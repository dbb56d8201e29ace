// The batch-invariant CPU GEMM (see batch_invariant_gemm_cpu.h): AVX-512 and portable dot-product tiles,
// and the dispatch to the AMX path.
//
// Work items are (group, a run of its rows, a run of kItemCols output columns), scheduled dynamically over
// the OpenMP threads; an output element is computed whole inside one item, so the schedule never changes
// a result. Inside an item, a tile of kTileCols B rows stays in L1 while the item's rows stream past it.
#include "moe/batch_invariant_gemm_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/float_bits.h"
#include "common/host_device.h"
#include "moe/element.h"

#include "moe/avx512_util.h"

namespace llada {
namespace moe {

namespace {

constexpr int64_t kTileRows = 4;                 // rows of A per register tile
constexpr int64_t kTileCols = 4;                 // rows of B (output columns) per register tile
constexpr int64_t kLanes = 16;                   // fp32 lanes of one accumulator
constexpr int64_t kItemCols = 48;                // output columns per work item
constexpr int64_t kItemABytes = int64_t{256} << 10;  // fp32 A bytes per work item (its rows stay in L2)
static_assert(kTileRows * kTileCols == kLanes, "a tile's sums fill one 16-lane vector");

enum class Path { kAvx512, kPortable };

Path cpu_path(CpuIsa isa) {
  if (isa == CpuIsa::kPortable) return Path::kPortable;
#if LLADA_AVX512_KERNELS
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512) return Path::kAvx512;
#endif
  return Path::kPortable;
}

// The fixed addition tree of 16 lanes that both paths use: pairs (l, l + 8), then (l, l + 4), (l, l + 2), (l, l + 1).
LLADA_HD float sum_lanes(const float* x) {
  float s[8];
  for (int l = 0; l < 8; ++l) s[l] = x[l] + x[l + 8];
  for (int l = 0; l < 4; ++l) s[l] = s[l] + s[l + 4];
  for (int l = 0; l < 2; ++l) s[l] = s[l] + s[l + 2];
  return s[0] + s[1];
}

// ---- A as the kernels read it ------------------------------------------------------------------------
// fp32 rows of `ld` floats. fp32 input: A itself (ld = K, tails read masked or bounded). Otherwise
// a widened copy, zero-padded to a whole step: on the AVX-512 path a bf16 step is 32 wide and laid out as
// its 16 even then its 16 odd K indices (the order in which the kernel widens B's bf16 pairs).

int64_t a_step(DType dtype, Path path) { return path == Path::kAvx512 && dtype == DType::kBFloat16 ? 32 : kLanes; }

template <typename T>
const float* widen_a(const T* a, int64_t m, int64_t K, int64_t ld, bool deinterleave, std::vector<float>& out) {
  out.assign(static_cast<size_t>(m * ld), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; ++r) {
    float* dst = out.data() + r * ld;
    const T* src = a + r * K;
    if (!deinterleave) {
      for (int64_t k = 0; k < K; ++k) dst[k] = to_float(src[k]);
    } else {
      for (int64_t k = 0; k < K; ++k) dst[(k & ~int64_t{31}) + ((k & 1) << 4) + ((k & 31) >> 1)] = to_float(src[k]);
    }
  }
  return out.data();
}

// ---- portable tiles ----------------------------------------------------------------------------------
// out[4 c + r] = <a_rows[r], b_rows[c]>: lane l sums the K indices l mod 16 in order, then sum_lanes.
// Reads K elements of each row (lanes past K count as zero).
template <typename T>
__attribute__((always_inline)) inline void dot_tile_portable(const float* const* a_rows, const T* const* b_rows,
                                                             int64_t K, float* out) {
  float acc[kTileRows * kTileCols][kLanes] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int64_t n = std::min(kLanes, K - k0);
    float b[kTileCols][kLanes] = {};
    for (int64_t c = 0; c < kTileCols; ++c)
      for (int64_t l = 0; l < n; ++l) b[c][l] = to_float(b_rows[c][k0 + l]);
    for (int64_t r = 0; r < kTileRows; ++r) {
      float a[kLanes] = {};
      for (int64_t l = 0; l < n; ++l) a[l] = a_rows[r][k0 + l];
      for (int64_t c = 0; c < kTileCols; ++c) {
        float* lanes = acc[r * kTileCols + c];
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[l] * b[c][l];
      }
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t c = 0; c < kTileCols; ++c) out[kTileRows * c + r] = sum_lanes(acc[r * kTileCols + c]);
}

LLADA_CPU_MULTIVERSION void dot_tile_portable_f32(const float* const* a, const float* const* b, int64_t K, float* out) {
  dot_tile_portable(a, b, K, out);
}
LLADA_CPU_MULTIVERSION void dot_tile_portable_bf16(const float* const* a, const Bf16* const* b, int64_t K, float* out) {
  dot_tile_portable(a, b, K, out);
}
LLADA_CPU_MULTIVERSION void dot_tile_portable_f16(const float* const* a, const Half* const* b, int64_t K, float* out) {
  dot_tile_portable(a, b, K, out);
}
void dot_tile_portable_any(const float* const* a, const float* const* b, int64_t K, float* out) {
  dot_tile_portable_f32(a, b, K, out);
}
void dot_tile_portable_any(const float* const* a, const Bf16* const* b, int64_t K, float* out) {
  dot_tile_portable_bf16(a, b, K, out);
}
void dot_tile_portable_any(const float* const* a, const Half* const* b, int64_t K, float* out) {
  dot_tile_portable_f16(a, b, K, out);
}

// ---- AVX-512 tiles -----------------------------------------------------------------------------------
#if LLADA_AVX512_KERNELS
// 16 accumulators -> one vector of their sums, lane 4 c + r the sum of v[4 r + c], every one by the tree of
// sum_lanes: 128-bit quarters q0 + q2 and q1 + q3, then their sum, then lanes (0, 2), (1, 3), then (0, 1).
LLADA_AVX512_INLINE __m512 sum16(const __m512* v) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// acc[4 r + c] += a[r] * b[c]
LLADA_AVX512_INLINE void tile_fma(const __m512* a, const __m512* b, __m512* acc) {
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t c = 0; c < kTileCols; ++c) acc[r * kTileCols + c] = _mm512_fmadd_ps(a[r], b[c], acc[r * kTileCols + c]);
}

// fp32: A read in place (K floats a row), 16 K indices a step, the tail by masked loads.
LLADA_AVX512_TARGET void dot_tile_avx512(const float* const* a_rows, const float* const* b_rows, int64_t K, float* out) {
  __m512 acc[kTileRows * kTileCols], a[kTileRows], b[kTileCols];
  for (auto& v : acc) v = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = _mm512_loadu_ps(a_rows[r] + k);
    for (int64_t c = 0; c < kTileCols; ++c) b[c] = _mm512_loadu_ps(b_rows[c] + k);
    tile_fma(a, b, acc);
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = _mm512_maskz_loadu_ps(mask, a_rows[r] + k);
    for (int64_t c = 0; c < kTileCols; ++c) b[c] = _mm512_maskz_loadu_ps(mask, b_rows[c] + k);
    tile_fma(a, b, acc);
  }
  _mm512_storeu_ps(out, sum16(acc));
}

// bf16: 32 K indices a step; a 32-bit word of B holds a pair, widened to fp32 by a shift (even index) and a
// mask (odd index); A is the de-interleaved widened copy, zero-padded, so its loads are whole.
LLADA_AVX512_TARGET void dot_tile_avx512(const float* const* a_rows, const Bf16* const* b_rows, int64_t K, float* out) {
  __m512 acc[kTileRows * kTileCols], a_even[kTileRows], a_odd[kTileRows], b_even[kTileCols], b_odd[kTileCols];
  for (auto& v : acc) v = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (K - k)) - 1u);
    for (int64_t r = 0; r < kTileRows; ++r) {
      a_even[r] = _mm512_loadu_ps(a_rows[r] + k);
      a_odd[r] = _mm512_loadu_ps(a_rows[r] + k + 16);
    }
    for (int64_t c = 0; c < kTileCols; ++c) {
      const __m512i w = _mm512_maskz_loadu_epi16(mask, b_rows[c] + k);
      b_even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      b_odd[c] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
    }
    tile_fma(a_even, b_even, acc);
    tile_fma(a_odd, b_odd, acc);
  }
  _mm512_storeu_ps(out, sum16(acc));
}

// fp16: 16 K indices a step, B widened by VCVTPH2PS; A is the widened copy, zero-padded.
LLADA_AVX512_TARGET void dot_tile_avx512(const float* const* a_rows, const Half* const* b_rows, int64_t K, float* out) {
  __m512 acc[kTileRows * kTileCols], a[kTileRows], b[kTileCols];
  for (auto& v : acc) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    const __mmask16 mask = K - k >= kLanes ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (K - k)) - 1u);
    for (int64_t r = 0; r < kTileRows; ++r) a[r] = _mm512_loadu_ps(a_rows[r] + k);
    for (int64_t c = 0; c < kTileCols; ++c) b[c] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, b_rows[c] + k));
    tile_fma(a, b, acc);
  }
  _mm512_storeu_ps(out, sum16(acc));
}
#endif

template <typename T>
void dot_tile(Path path, const float* const* a_rows, const T* const* b_rows, int64_t K, float* out) {
#if LLADA_AVX512_KERNELS
  if (path == Path::kAvx512) return dot_tile_avx512(a_rows, b_rows, K, out);
#endif
  dot_tile_portable_any(a_rows, b_rows, K, out);
}

struct Item {
  int64_t group, m_begin, m_end, n_begin;
};


template <typename T>
void run_tiles(const GroupedGemmParams& p, const float* a, int64_t lda, Path path) {
  const int64_t N = p.n, K = p.k;
  const int64_t item_rows =
      std::max(kTileRows, kItemABytes / (std::max<int64_t>(lda, 1) * static_cast<int64_t>(sizeof(float))) / kTileRows * kTileRows);
  std::vector<Item> items;
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t m = p.offsets[g]; m < p.offsets[g + 1]; m += item_rows)
      for (int64_t n = 0; n < N; n += kItemCols) items.push_back({g, m, std::min<int64_t>(m + item_rows, p.offsets[g + 1]), n});
  const T* b = static_cast<const T*>(p.b);
  T* c = static_cast<T*>(p.c);
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < items.size(); ++i) {
    const Item it = items[i];
    const int64_t n_end = std::min(N, it.n_begin + kItemCols);
    const T* b_rows[kTileCols];
    const float* a_rows[kTileRows];
    float sums[kLanes];
    for (int64_t n = it.n_begin; n < n_end; n += kTileCols) {
      for (int64_t j = 0; j < kTileCols; ++j)  // past N: repeat the last row of B (computed, dropped)
        b_rows[j] = b + it.group * p.b_stride_group + std::min(n + j, N - 1) * p.b_stride_n;
      const int64_t cols = std::min(kTileCols, n_end - n);
      for (int64_t m = it.m_begin; m < it.m_end; m += kTileRows) {
        for (int64_t r = 0; r < kTileRows; ++r)  // past the item's rows: repeat its last row
          a_rows[r] = a + std::min(m + r, it.m_end - 1) * lda;
        dot_tile(path, a_rows, b_rows, K, sums);
        const int64_t rows = std::min(kTileRows, it.m_end - m);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j) c[(m + r) * N + n + j] = from_float<T>(sums[kTileRows * j + r]);
      }
    }
  }
}

template <typename T>
void dot_gemm(const GroupedGemmParams& p) {
  const Path path = cpu_path(p.cpu_isa);
  if constexpr (std::is_same_v<T, float>) {
    run_tiles<T>(p, static_cast<const float*>(p.a), p.k, path);
  } else {
    const int64_t step = a_step(p.dtype, path), ld = std::max<int64_t>(step, (p.k + step - 1) / step * step);
    std::vector<float> storage;
    const float* a = widen_a(static_cast<const T*>(p.a), p.m, p.k, ld, step == 32, storage);
    run_tiles<T>(p, a, ld, path);
  }
}

}  // namespace

bool batch_invariant_gemm_uses_amx(const GroupedGemmParams& p) {
  return p.dtype == DType::kBFloat16 && p.k > 0 && p.k % 32 == 0 && p.b_stride_k == 1 &&
         p.cpu_isa == CpuIsa::kBest && amx_bf16_usable();
}

void batch_invariant_gemm(const GroupedGemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  if (batch_invariant_gemm_uses_amx(p)) return amx_gemm_bf16(p);
  switch (p.dtype) {
    case DType::kFloat32: return dot_gemm<float>(p);
    case DType::kBFloat16: return dot_gemm<Bf16>(p);
    case DType::kFloat16: return dot_gemm<Half>(p);
  }
}

}  // namespace moe

const char* batch_invariant_gemm_cpu_path(DType dtype, CpuIsa isa) {
  if (dtype == DType::kBFloat16 && isa == CpuIsa::kBest && moe::amx_bf16_usable()) return "amx";
  return moe::cpu_path(isa) == moe::Path::kAvx512 ? "avx512" : "portable";
}

CpuIsa cpu_isa_from_env() {
  const char* cap = std::getenv("LLADA_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) return CpuIsa::kAvx512;
  if (cap != nullptr && std::strcmp(cap, "portable") == 0) return CpuIsa::kPortable;
  return CpuIsa::kBest;
}

}  // namespace llada
