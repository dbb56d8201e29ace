// Minimal assertion helpers for the C++ unit tests run by ctest (no framework needed).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace llada_test {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace llada_test

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++llada_test::failures();                                              \
    }                                                                        \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                               \
  do {                                                                                      \
    const double va_ = (a), vb_ = (b);                                                      \
    if (!(std::fabs(va_ - vb_) <= (tol))) {                                                 \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.9g, %s = %.9g, tol %.3g\n", __FILE__, \
                   __LINE__, #a, va_, #b, vb_, static_cast<double>(tol));                   \
      ++llada_test::failures();                                                             \
    }                                                                                       \
  } while (0)

#define TEST_MAIN_END()                                                    \
  do {                                                                     \
    if (llada_test::failures()) {                                          \
      std::fprintf(stderr, "%d check(s) failed\n", llada_test::failures()); \
      return 1;                                                            \
    }                                                                      \
    std::printf("all checks passed\n");                                    \
    return 0;                                                              \
  } while (0)
