// Element access for the MoE CPU kernels: fp32, bf16 and fp16 storage read and written as fp32
// (rounded to nearest even), so each kernel is one template over the storage type.
#pragma once

#include <cstdint>

#include "common/float_bits.h"

namespace llada {
namespace moe {

struct Bf16 {
  uint16_t bits;
};

struct Half {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(Bf16 v) { return bf16_bits_to_float(v.bits); }
inline float to_float(Half v) { return fp16_bits_to_float(v.bits); }

template <typename T>
inline T from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline Bf16 from_float<Bf16>(float v) {
  const uint32_t u = float_to_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(rounded >> 16)};
}

template <>
inline Half from_float<Half>(float v) {
  return Half{float_to_fp16_bits(v)};
}

}  // namespace moe
}  // namespace llada
