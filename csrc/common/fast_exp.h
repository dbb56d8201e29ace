// exp(x) for x <= 0 in fp32, branch-free so that CPU loops over a vocabulary vectorise.
//
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the Cephes degree-6 polynomial for e^r
// (relative error about 1e-7) and 2^n built in the exponent bits. Inputs below -87 are clamped
// (e^-87 ~ 1.6e-38, which is below what a softmax over any vocabulary can resolve).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/float_bits.h"
#include "common/host_device.h"

namespace llada {

LLADA_HD float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t) & 0x7FFFFFu) - 0x400000;
  return p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}

}  // namespace llada
