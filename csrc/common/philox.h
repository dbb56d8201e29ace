// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11), shared by CPU and CUDA.
//
// A draw is a pure function of (seed, counter): the same step gives the same numbers on every
// device and under CUDA-graph replay. The Python reference re-implements the same function in
// torch integer ops (llada_engine/ops/philox.py); tests/cpp/test_philox.cpp pins known values.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace llada {

struct Philox4x32 {
  uint32_t v[4];
};

LLADA_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

// Ten rounds of Philox4x32 on counter c with key k.
LLADA_HD Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c.v[0], hi0, lo0);
    philox_mulhilo(kM1, c.v[2], hi1, lo1);
    c = Philox4x32{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Uniform float in [0, 1) with 24 random bits, exact in fp32.
LLADA_HD float uint_to_unit_float(uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

// The uniform that `commit_tokens` uses for row `row` of a call with (seed, offset): counter (row, offset),
// key seed, first output word. row = b * L + l with one stream over the batch, l with a stream per sequence
// (sampling/sequence_sampling.h).
LLADA_HD float commit_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  const Philox4x32 c{{static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                      static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  const Philox4x32 r =
      philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return uint_to_unit_float(r.v[0]);
}

}  // namespace llada
