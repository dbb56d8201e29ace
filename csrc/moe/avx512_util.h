// AVX-512 helpers of the CPU GEMM kernels, compiled per function for the AVX-512 subset they need (callers
// check the CPU first): a 16 x 16 transpose of 32-bit elements.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised `__Y` of its own _mm512_undefined_* helpers; nothing here is uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define LLADA_AVX512_KERNELS 1
#define LLADA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define LLADA_AVX512_INLINE LLADA_AVX512_TARGET inline __attribute__((always_inline))

namespace llada {
namespace moe {

// r[i] (16 dwords each) becomes column i of the 16 x 16 matrix whose rows they were.
LLADA_AVX512_INLINE void transpose16(__m512i* r) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x88), c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x88);
    const __m512i d1 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[4 + e] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

}  // namespace moe
}  // namespace llada

#else
#define LLADA_AVX512_KERNELS 0
#endif
