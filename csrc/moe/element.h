// Element access for the MoE CPU kernels: fp32 and bf16 storage read and written as fp32
// (bf16 rounded to nearest even), so each kernel is one template over the storage type.
#pragma once

#include <cstdint>

#include "common/float_bits.h"

namespace llada {
namespace moe {

struct Bf16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(Bf16 v) { return bf16_bits_to_float(v.bits); }

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

}  // namespace moe
}  // namespace llada
