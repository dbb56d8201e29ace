// CPU building blocks of the block-attention kernels (block_attention_*_cpu.cpp): row loads with dtype
// conversion, a register-blocked fp32 GEMM micro-kernel, and the masked exponentials of a score tile.
//
// Everything here is always inlined into the per-task functions, which are compiled once per x86 ISA
// level (LLADA_CPU_MULTIVERSION: AVX-512, AVX2, baseline) and picked at load time, so the library runs on
// any x86-64 CPU and uses 512-bit FMAs where the CPU has them. A lambda inside a cloned function is
// not cloned (it compiles for the baseline ISA): hot helpers are LLADA_CPU_INLINE functions instead.
// Tiles are BQ query rows x BK keys.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/block_mask.h"
#include "common/fast_exp.h"
#include "common/float_bits.h"
#include "llada/attention.h"

#include "common/host_device.h"

#define LLADA_CPU_INLINE inline __attribute__((always_inline))

namespace llada {
namespace cpu {

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

typedef float vf16 __attribute__((vector_size(64)));

// dst[0, n) = scale * src row of `dtype`.
LLADA_CPU_INLINE void load_row(float* dst, const void* src, DType dtype, int64_t n, float scale) {
  if (dtype == DType::kFloat32) {
    const float* s = static_cast<const float*>(src);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = s[d] * scale;
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16_bits_to_float(s[d]) * scale;
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = fp16_bits_to_float(s[d]) * scale;
  }
}

LLADA_CPU_INLINE void store_row(void* dst, const float* src, DType dtype, int64_t n) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    uint16_t* o = static_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) o[d] = float_to_bf16_bits(src[d]);
  }
}

LLADA_CPU_INLINE size_t dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// A strided matrix of rows in global memory: row r starts at base + r * row_stride elements.
struct Rows {
  const char* base = nullptr;
  int64_t row_stride = 0;  // in elements
  DType dtype = DType::kFloat32;

  LLADA_CPU_INLINE const void* row(int64_t r) const {
    return base + static_cast<size_t>(r * row_stride) * dtype_bytes(dtype);
  }
};

// dst [rows_padded x D] = scale * rows [0, n), zero rows n..rows_padded. `src` is Rows or any view with
// row(r) and dtype (the decode form's paged cache).
template <class RowsT>
LLADA_CPU_INLINE void load_tile(float* dst, const RowsT& src, int64_t n, int64_t rows_padded, int64_t D,
                                float scale) {
  for (int64_t r = 0; r < n; ++r) load_row(dst + r * D, src.row(r), src.dtype, D, scale);
  if (n < rows_padded) std::memset(dst + n * D, 0, static_cast<size_t>((rows_padded - n) * D) * sizeof(float));
}

// dst [D x ld] = scale * rows [0, n) transposed; columns n..ld are zero. `row` is a D-float buffer.
template <class RowsT>
LLADA_CPU_INLINE void load_tile_transposed(float* dst, int64_t ld, const RowsT& src, int64_t n, int64_t D,
                                           float scale, float* row) {
  if (n < ld) {
    for (int64_t d = 0; d < D; ++d) std::memset(dst + d * ld + n, 0, static_cast<size_t>(ld - n) * sizeof(float));
  }
  for (int64_t r = 0; r < n; ++r) {
    load_row(row, src.row(r), src.dtype, D, scale);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = row[d];
  }
}

// C[MR x 16 NV] (+)= A[MR x K] B[K x 16 NV], all row-major with leading dimensions.
template <int MR, int NV, bool kAccumulate>
LLADA_CPU_INLINE void gemm_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                                 int64_t ldc) {
  vf16 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      c[r][v] = vf16{};
      if (kAccumulate) std::memcpy(&c[r][v], C + r * ldc + 16 * v, sizeof(vf16));
    }
  for (int64_t k = 0; k < K; ++k) {
    vf16 b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + 16 * v, sizeof(vf16));
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * ldc + 16 * v, &c[r][v], sizeof(vf16));
}

template <int MR, bool kAccumulate>
LLADA_CPU_INLINE void gemm_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                float* C, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 64 <= N; n0 += 64) gemm_block<MR, 4, kAccumulate>(K, A, lda, B + n0, ldb, C + n0, ldc);
  for (; n0 + 16 <= N; n0 += 16) gemm_block<MR, 1, kAccumulate>(K, A, lda, B + n0, ldb, C + n0, ldc);
  for (int r = 0; r < MR; ++r)
    for (int64_t n = n0; n < N; ++n) {
      float acc = kAccumulate ? C[r * ldc + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += A[r * lda + k] * B[k * ldb + n];
      C[r * ldc + n] = acc;
    }
}

// C[M x N] (+)= A[M x K] B[K x N], fp32, row-major with leading dimensions. Panels of 6 rows x 64
// columns keep 24 accumulators in AVX-512 registers.
template <bool kAccumulate>
LLADA_CPU_INLINE void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc) {
  int64_t m0 = 0;
  for (; m0 + 6 <= M; m0 += 6) gemm_rows<6, kAccumulate>(N, K, A + m0 * lda, lda, B, ldb, C + m0 * ldc, ldc);
  const float* a = A + m0 * lda;
  float* c = C + m0 * ldc;
  switch (M - m0) {
    case 5: gemm_rows<5, kAccumulate>(N, K, a, lda, B, ldb, c, ldc); break;
    case 4: gemm_rows<4, kAccumulate>(N, K, a, lda, B, ldb, c, ldc); break;
    case 3: gemm_rows<3, kAccumulate>(N, K, a, lda, B, ldb, c, ldc); break;
    case 2: gemm_rows<2, kAccumulate>(N, K, a, lda, B, ldb, c, ldc); break;
    case 1: gemm_rows<1, kAccumulate>(N, K, a, lda, B, ldb, c, ldc); break;
    default: break;
  }
}

// Mask coordinates of the rows of a tile, so that a partial tile compares integers per element.
struct TileCoords {
  int32_t block[BQ > BK ? BQ : BK];
  bool clean[BQ > BK ? BQ : BK];
};

LLADA_CPU_INLINE void query_coords(TileCoords& c, const DocMask& m, int64_t r0, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const MaskCoord q = query_coord(m, r0 + i);
    c.block[i] = static_cast<int32_t>(q.block);
    c.clean[i] = q.clean;
  }
}

LLADA_CPU_INLINE void key_coords(TileCoords& c, const DocMask& m, int64_t r0, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const MaskCoord k = key_coord(m, r0 + j);
    c.block[j] = static_cast<int32_t>(k.block);
    c.clean[j] = k.clean;
  }
}

// s[0, n) = -inf where query (qb, qc) does not see key j of the tile.
LLADA_CPU_INLINE void mask_row(float* s, AttentionMask kind, int32_t qb, bool qc, const TileCoords& kc, int64_t n) {
  if (kind == AttentionMask::kBlockCausal) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = kc.block[j] <= qb ? s[j] : kNegInf;
  } else if (qc) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = (kc.clean[j] && kc.block[j] <= qb) ? s[j] : kNegInf;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = (kc.clean[j] ? kc.block[j] < qb : kc.block[j] == qb) ? s[j] : kNegInf;
  }
}

// s[0, n) = exp(s - shift), exactly 0 where s is -inf; returns the sum.
LLADA_CPU_INLINE float exp_row(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(s[j] - shift);
    const float p = s[j] == kNegInf ? 0.0f : e;
    s[j] = p;
    sum += p;
  }
  return sum;
}

// The max of s[0, n), NaN when one of them is NaN (attention/softmax_rule.h).
LLADA_CPU_INLINE float max_row(const float* s, int64_t n) {
  float m = kNegInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    m = s[j] > m ? s[j] : m;
    nan |= s[j] != s[j];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

}  // namespace cpu
}  // namespace llada
