// Philox4x32-10 against the published known-answer vectors, and the uniform used by commit_tokens.
#include "check.h"
#include "common/philox.h"

using llada::Philox4x32;

static void check_kat(Philox4x32 ctr, uint32_t k0, uint32_t k1, Philox4x32 want) {
  const Philox4x32 got = llada::philox4x32_10(ctr, k0, k1);
  for (int i = 0; i < 4; ++i) CHECK(got.v[i] == want.v[i]);
}

int main() {
  check_kat({{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}});
  check_kat({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu,
            {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}});
  check_kat({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
            {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}});

  CHECK(llada::uint_to_unit_float(0u) == 0.0f);
  CHECK(llada::uint_to_unit_float(0xffffffffu) < 1.0f);
  // Different rows, seeds and offsets give different uniforms; the same inputs give the same one.
  const float u = llada::commit_uniform(7, 3, 11);
  CHECK(u == llada::commit_uniform(7, 3, 11));
  CHECK(u != llada::commit_uniform(7, 3, 12));
  CHECK(u != llada::commit_uniform(8, 3, 11));
  CHECK(u != llada::commit_uniform(7, 4, 11));
  double mean = 0.0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) mean += llada::commit_uniform(1, 0, i);
  mean /= n;
  CHECK_NEAR(mean, 0.5, 0.01);
  TEST_MAIN_END();
}
