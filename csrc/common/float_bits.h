// Bit-level conversions shared by CPU and CUDA: bf16/fp16 storage to and from fp32, and the order-preserving
// unsigned key of a float used by radix selection (a < b  <=>  key(a) < key(b) for non-NaN floats).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace llada {

LLADA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

LLADA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

LLADA_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// fp32 to bf16 bits, round to nearest even; NaN stays a quiet NaN.
LLADA_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 to binary32, exact for every input and branch-free (so CPU loops vectorise):
// the exponent and mantissa are moved into place and rescaled by 2^(127-15), which also turns
// half subnormals into the right fp32 normals; exponent 31 (inf, NaN) is patched by a select.
LLADA_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t body = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const float scaled = bits_to_float(body) * 5.192296858534828e33f;  // 2^112
  const uint32_t finite_bits = float_to_bits(scaled);
  const uint32_t special_bits = body | 0x7F800000u;
  const bool special = (h & 0x7C00u) == 0x7C00u;
  return bits_to_float(sign | (special ? special_bits : finite_bits));
}

// fp32 to IEEE binary16 bits, round to nearest even (overflow to inf, half subnormals, NaN stays a quiet NaN).
LLADA_HD uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // 65520 and up round to inf
  if (a < 0x38800000u) {                        // below 2^-14: a subnormal half, round(f * 2^24) ulps
    const float scaled = bits_to_float(a) * 16777216.0f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
    return sign | static_cast<uint16_t>(float_to_bits(scaled) - 0x4B400000u);
  }
  const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

LLADA_HD uint32_t float_order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LLADA_HD float float_from_order_key(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

}  // namespace llada
