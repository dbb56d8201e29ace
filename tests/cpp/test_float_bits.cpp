// bf16/fp16 decoding against exact references for every 16-bit pattern, fp16 encoding (round to nearest
// even) at every half and every midpoint between halves, the branch-free exp, and the order-preserving
// float key used by radix selection.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "check.h"
#include "common/fast_exp.h"
#include "common/float_bits.h"

// Textbook binary16 decoding, the oracle for the branch-free one.
static float fp16_oracle(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float v;
  if (exp == 0x1F) v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else v = std::ldexp(1.0f + mant / 1024.0f, exp - 15);
  return sign ? -v : v;
}

int main() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = llada::fp16_bits_to_float(static_cast<uint16_t>(h));
    const float want = fp16_oracle(static_cast<uint16_t>(h));
    if (std::isnan(want)) CHECK(std::isnan(got));
    else CHECK(got == want && std::signbit(got) == std::signbit(want));
    const float bf = llada::bf16_bits_to_float(static_cast<uint16_t>(h));
    uint32_t bits;
    std::memcpy(&bits, &bf, 4);
    CHECK(bits == (h << 16));
  }

  // fp16 encoding: every finite half back to itself; a midpoint to the even neighbour, a hair off it to the
  // nearer one; 65520 (the midpoint to 2^16) and up to inf; NaN to a quiet NaN.
  for (uint32_t h = 0; h < 0x7BFFu; ++h) {
    for (const uint32_t s : {0u, 0x8000u}) {
      const float v = llada::fp16_bits_to_float(static_cast<uint16_t>(h | s));
      CHECK(llada::float_to_fp16_bits(v) == (h | s));
      const float next = llada::fp16_bits_to_float(static_cast<uint16_t>((h + 1) | s));
      const float mid = static_cast<float>((static_cast<double>(v) + next) / 2);
      const uint32_t even = (h & 1u) ? h + 1 : h;
      CHECK(llada::float_to_fp16_bits(mid) == (even | s));
      CHECK(llada::float_to_fp16_bits(std::nextafter(mid, v)) == (h | s));
      CHECK(llada::float_to_fp16_bits(std::nextafter(mid, next)) == ((h + 1) | s));
    }
  }
  CHECK(llada::float_to_fp16_bits(65504.0f) == 0x7BFFu && llada::float_to_fp16_bits(65519.996f) == 0x7BFFu);
  CHECK(llada::float_to_fp16_bits(65520.0f) == 0x7C00u);
  CHECK(llada::float_to_fp16_bits(1e30f) == 0x7C00u && llada::float_to_fp16_bits(-1e30f) == 0xFC00u);
  CHECK(llada::float_to_fp16_bits(std::numeric_limits<float>::infinity()) == 0x7C00u);
  CHECK(llada::float_to_fp16_bits(std::numeric_limits<float>::quiet_NaN()) == 0x7E00u);
  CHECK(llada::float_to_fp16_bits(1e-10f) == 0u && llada::float_to_fp16_bits(-1e-10f) == 0x8000u);

  double worst = 0.0;
  for (float x = -90.0f; x <= 0.0f; x += 0.00137f) {
    const double want = std::exp(static_cast<double>(x < -87.0f ? -87.0f : x));
    worst = std::fmax(worst, std::fabs(llada::exp_nonpositive(x) - want) / want);
  }
  CHECK(worst < 3e-7);
  CHECK(llada::exp_nonpositive(0.0f) == 1.0f);
  CHECK(llada::exp_nonpositive(-std::numeric_limits<float>::infinity()) < 1e-37f);

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  for (int i = 0; i < 100000; ++i) {
    const float a = normal(rng), b = normal(rng);
    CHECK((a < b) == (llada::float_order_key(a) < llada::float_order_key(b)));
    CHECK(llada::float_from_order_key(llada::float_order_key(a)) == a);
  }
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(llada::float_order_key(-inf) < llada::float_order_key(-1e30f));
  CHECK(llada::float_order_key(-0.0f) < llada::float_order_key(1e-45f));
  TEST_MAIN_END();
}
