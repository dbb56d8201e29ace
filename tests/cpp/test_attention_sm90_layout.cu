// What the Hopper forward of block attention (csrc/attention/block_attention_fwd_sm90.cu) assumes of its
// CuTe layouts (csrc/attention/attention_sm90.cuh), checked on the CPU by layout algebra: each consumer
// thread's accumulator holds two rows, 8 apart, shared with exactly the other lanes of its quad; the S
// accumulator re-read as the A operand of O = P V names the elements that operand expects; the shared
// memory fits a CTA. Host code only: it needs nvcc and CUTLASS, not a GPU.
#include <cstdio>

#include "attention/attention_sm90.cuh"
#include "check.h"

using namespace cute;
using namespace llada::attention_sm90;

template <class Mma, int M, int N>
void check_accumulator_rows(const char* what) {
  Mma mma;
  for (int t = 0; t < size(mma); ++t) {
    auto coords = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto rc = make_tensor(coords.data(), acc_rowcol(coords.layout()));
    CHECK(size<0>(rc) == 2);
    const int row0 = 64 * (t / 128) + 16 * ((t % 128) / 32) + (t % 32) / 4;
    for (int hh = 0; hh < size<0>(rc); ++hh)
      for (int c = 0; c < size<1>(rc); ++c) {
        const int r = get<0>(rc(hh, c)), col = get<1>(rc(hh, c));
        if (r != row0 + 8 * hh || col != get<1>(rc(0, c)) || col % 8 != (t % 4) * 2 + c % 2 ||
            (c % 2 == 1 && col != get<1>(rc(hh, c - 1)) + 1)) {
          std::fprintf(stderr, "%s: thread %d value (%d, %d) at (%d, %d)\n", what, t, hh, c, r, col);
          CHECK(false);
          return;
        }
      }
    CHECK(size<1>(rc) * 4 == N);  // a quad's four lanes cover the row
  }
}

template <class MmaS, class MmaO, int M, int N>
void check_p_as_a_operand() {
  MmaS mma_s;
  MmaO mma_o;
  for (int t = 0; t < size(mma_s); ++t) {
    auto s = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto as_a = make_tensor(s.data(), acc_as_a_operand(s.layout()));
    auto a = mma_o.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    CHECK(size(as_a) == size(a));
    CHECK(rank(as_a) == rank(a) && size<2>(as_a) == size<2>(a));
    for (int i = 0; i < size(a); ++i)
      if (as_a(i) != a(i)) {
        std::fprintf(stderr, "P as A operand: thread %d value %d at (%d, %d), the operand expects (%d, %d)\n", t, i,
                     int(get<0>(as_a(i))), int(get<1>(as_a(i))), int(get<0>(a(i))), int(get<1>(a(i))));
        CHECK(false);
        return;
      }
  }
}

template <class T, int D>
void check_config() {
  using C = Config<T, D>;
  check_accumulator_rows<typename C::MmaQK, C::kBM, C::kBN>("S accumulator");
  check_accumulator_rows<typename C::MmaPV, C::kBM, D>("O accumulator");
  check_p_as_a_operand<typename C::MmaQK, typename C::MmaPV, C::kBM, C::kBN>();
  CHECK(size(typename C::MmaQK{}) == C::kConsumerThreads && size(typename C::MmaPV{}) == C::kConsumerThreads);
  // V^T [D, BN] per stage is the same memory as V [BN, D].
  const auto v = typename C::SmemKV{};
  const auto vt = typename C::SmemVt{};
  for (int s = 0; s < C::kStages; ++s)
    for (int n = 0; n < C::kBN; ++n)
      for (int d = 0; d < D; d += 7) CHECK(vt(d, n, s) == v(n, d, s));
  const int smem = static_cast<int>(sizeof(T)) * (cosize(typename C::SmemQ{}) + 2 * cosize(v));
  CHECK(cosize(typename C::SmemQ{}) == C::kBM * D && cosize(v) == C::kBN * D * C::kStages);
  CHECK(smem + 1024 <= 227 * 1024);
  std::printf("D %d: %d bytes of tiles in shared memory\n", D, smem);
}

int main() {
  check_config<cutlass::bfloat16_t, 64>();
  check_config<cutlass::bfloat16_t, 128>();
  check_config<cutlass::half_t, 128>();
  TEST_MAIN_END();
}
