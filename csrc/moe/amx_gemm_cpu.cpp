// The AMX path of the batch-invariant CPU GEMM (bf16, K a multiple of 32; see batch_invariant_gemm_cpu.h).
//
// C tiles of 16 rows x 16 columns accumulate TDPBF16PS products: the A tile is 16 rows of A x 32 K read in
// place (a group's last, partial block of rows from a zero-padded copy), the B tile the same 32 K of 16
// rows of B[g] in the VNNI order TDPBF16PS wants, packed once per work item by a 16 x 16 transpose of
// 32-bit K pairs. Every output element is the same sequence of TDPBF16PS steps over K whatever the rows
// around it; the tile registers hold 2 x 2 C tiles, 2 A tiles and 2 B tiles. Work items are (group, up to
// kItemRows of its rows, kItemCols columns), scheduled dynamically; results are rounded to bf16 (nearest
// even) by AVX-512 integer code. Linux asks a process to request the tile state once (arch_prctl).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moe/batch_invariant_gemm_cpu.h"

#include "moe/avx512_util.h"

#if LLADA_AVX512_KERNELS && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LLADA_AMX_KERNELS 1
#define LLADA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define LLADA_AMX_INLINE LLADA_AMX_TARGET inline __attribute__((always_inline))
#else
#define LLADA_AMX_KERNELS 0
#endif

namespace llada {
namespace moe {

#if LLADA_AMX_KERNELS
namespace {

constexpr int64_t kTile = 16;        // rows and columns of a C tile, rows of an A tile
constexpr int64_t kStepK = 32;       // K of one TDPBF16PS
constexpr int64_t kItemCols = 2 * kTile;
constexpr int64_t kItemRows = 256;   // a multiple of 2 * kTile
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_requested() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512dq") ||
      !__builtin_cpu_supports("avx512vl"))
    return false;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// out [K / 32][16 pairs][16 columns][2] = rows [0, rows) of b (row stride ld), in VNNI order; rows past `rows` zero.
LLADA_AMX_TARGET void pack_b(const uint16_t* b, int64_t ld, int64_t rows, int64_t K, uint16_t* out) {
  for (int64_t k = 0; k < K; k += kStepK) {
    __m512i r[kTile];
    for (int64_t n = 0; n < kTile; ++n) r[n] = n < rows ? _mm512_loadu_si512(b + n * ld + k) : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t p = 0; p < kTile; ++p) _mm512_storeu_si512(out + (k / kStepK) * kTile * kStepK + p * kStepK, r[p]);
  }
}

// bf16 bits of 16 floats, nearest even; NaN stays a quiet NaN (as from_float<Bf16>).
LLADA_AMX_INLINE __m256i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// C rows [m, m + rows) x columns [n, n + cols) from the fp32 tile (row stride kTile).
LLADA_AMX_INLINE void store_tile(const float* tile, int64_t rows, int64_t cols, uint16_t* c, int64_t ldc) {
  const __mmask16 mask = static_cast<__mmask16>(cols >= kTile ? 0xFFFFu : (1u << cols) - 1u);
  for (int64_t r = 0; r < rows; ++r)
    _mm256_mask_storeu_epi16(c + r * ldc, mask, round_bf16(_mm512_loadu_ps(tile + r * kTile)));
}

struct Item {
  int64_t group, m_begin, m_end, n_begin;
};

LLADA_AMX_TARGET void amx_gemm(const GroupedGemmParams& p) {
  const int64_t N = p.n, K = p.k, steps = K / kStepK;
  std::vector<Item> items;
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t m = p.offsets[g]; m < p.offsets[g + 1]; m += kItemRows)
      for (int64_t n = 0; n < N; n += kItemCols)
        items.push_back({g, m, std::min<int64_t>(m + kItemRows, p.offsets[g + 1]), n});
  const uint16_t* a = static_cast<const uint16_t*>(p.a);
  const uint16_t* b = static_cast<const uint16_t*>(p.b);
  uint16_t* c = static_cast<uint16_t*>(p.c);
  const int64_t a_stride = K * 2;  // bytes
#pragma omp parallel
  {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = kTile;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    std::vector<uint16_t> b_packed(static_cast<size_t>(2 * steps * kTile * kStepK));
    std::vector<uint16_t> a_tail(static_cast<size_t>(kTile * K));
    alignas(64) float tile[kTile * kTile];
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      const Item it = items[i];
      const int64_t cols = std::min(kItemCols, N - it.n_begin);
      const uint16_t* bg = b + it.group * p.b_stride_group + it.n_begin * p.b_stride_n;
      uint16_t* b0 = b_packed.data();
      uint16_t* b1 = b0 + steps * kTile * kStepK;
      pack_b(bg, p.b_stride_n, std::min(kTile, cols), K, b0);
      pack_b(bg + kTile * p.b_stride_n, p.b_stride_n, std::max<int64_t>(0, cols - kTile), K, b1);
      for (int64_t m = it.m_begin; m < it.m_end; m += 2 * kTile) {
        // A blocks of 16 rows: in place when whole, else the valid rows of a zero-padded copy.
        const uint16_t* a_block[2];
        int64_t rows[2];
        for (int blk = 0; blk < 2; ++blk) {
          const int64_t m0 = m + blk * kTile;
          rows[blk] = std::max<int64_t>(0, std::min(kTile, it.m_end - m0));
          a_block[blk] = a + m0 * K;
          if (rows[blk] > 0 && rows[blk] < kTile) {
            std::memset(a_tail.data(), 0, a_tail.size() * sizeof(uint16_t));
            std::memcpy(a_tail.data(), a + m0 * K, static_cast<size_t>(rows[blk] * K) * sizeof(uint16_t));
            a_block[blk] = a_tail.data();
          }
        }
        _tile_zero(0);
        _tile_zero(1);
        if (rows[1] > 0) {
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(6, b0 + s * kTile * kStepK, 64);
          _tile_loadd(7, b1 + s * kTile * kStepK, 64);
          _tile_loadd(4, a_block[0] + s * kStepK, a_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (rows[1] > 0) {
            _tile_loadd(5, a_block[1] + s * kStepK, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        uint16_t* c_rows = c + m * N + it.n_begin;
        _tile_stored(0, tile, kTile * 4);
        store_tile(tile, rows[0], std::min(kTile, cols), c_rows, N);
        if (cols > kTile) {
          _tile_stored(1, tile, kTile * 4);
          store_tile(tile, rows[0], cols - kTile, c_rows + kTile, N);
        }
        if (rows[1] > 0) {
          _tile_stored(2, tile, kTile * 4);
          store_tile(tile, rows[1], std::min(kTile, cols), c_rows + kTile * N, N);
          if (cols > kTile) {
            _tile_stored(3, tile, kTile * 4);
            store_tile(tile, rows[1], cols - kTile, c_rows + kTile * N + kTile, N);
          }
        }
      }
    }
    _tile_release();
  }
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = amx_requested();
  return usable;
}

void amx_gemm_bf16(const GroupedGemmParams& p) { amx_gemm(p); }

#else

bool amx_bf16_usable() { return false; }
void amx_gemm_bf16(const GroupedGemmParams&) {}

#endif

}  // namespace moe
}  // namespace llada
