// What the Hopper forward of block attention (csrc/attention/block_attention_fwd_sm90.cu) assumes of its
// CuTe layouts (csrc/attention/attention_sm90.cuh), checked on the CPU by layout algebra: each consumer
// thread's accumulator holds two rows, 8 apart, shared with exactly the other lanes of its quad; the S
// accumulator re-read as the A operand of O = P V names the elements that operand expects; the shared
// memory fits a CTA. The same for the backward's three MMAs and its transposed views. Host code only: it needs
// nvcc and CUTLASS, not a GPU.
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
            col != get<1>(rc(0, 0)) + c % 2 + 8 * (c / 2)) {
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

// Descriptors of shared-memory operands: compiling their construction checks that each layout is one that
// wgmma reads in the major-ness the MMA declares. Compiled, never run: a descriptor needs a real shared-memory
// address.
template <class Mma, class LayoutA, class LayoutB>
void build_descriptors(LayoutA a, LayoutB b) {
  using T = typename Mma::ValTypeA;
  Mma mma;
  auto thr = mma.get_thread_slice(0);
  auto frag_b = thr.partition_fragment_B(make_tensor(make_smem_ptr(static_cast<T*>(nullptr)), b));
  CHECK(size(frag_b) > 0);
  if constexpr (!is_same_v<LayoutA, Underscore>) {
    auto frag_a = thr.partition_fragment_A(make_tensor(make_smem_ptr(static_cast<T*>(nullptr)), a));
    CHECK(size(frag_a) > 0);
  }
}

volatile bool never_true = false;

template <class T, int D>
void check_bwd_config() {
  using C = BwdConfig<T, D>;
  check_accumulator_rows<typename C::MmaSdP, C::kBN, C::kBM>("S^T accumulator");
  check_accumulator_rows<typename C::MmaKV, C::kBN, D>("dK/dV accumulator");
  check_p_as_a_operand<typename C::MmaSdP, typename C::MmaKV, C::kBN, C::kBM>();
  // dQ: both warpgroups hold all 64 query rows, warpgroup w the columns [w D / 2, (w + 1) D / 2).
  typename C::MmaQ mma_q;
  CHECK(size(mma_q) == C::kConsumerThreads);
  for (int t = 0; t < size(mma_q); ++t) {
    auto coords = mma_q.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<C::kBM>, Int<D>>{}));
    auto rc = make_tensor(coords.data(), acc_rowcol(coords.layout()));
    for (int hh = 0; hh < size<0>(rc); ++hh)
      for (int c = 0; c < size<1>(rc); ++c) {
        const int r = get<0>(rc(hh, c)), col = get<1>(rc(hh, c));
        CHECK(r == 16 * ((t % 128) / 32) + (t % 32) / 4 + 8 * hh);
        CHECK(col / (D / 2) == t / 128);
        CHECK(col == get<1>(rc(0, 0)) + c % 2 + 8 * (c / 2));  // the kernel's dq addressing
      }
  }
  // The kernel writes dS^T at dst_offset(n, m): CuTe applies the swizzle to the byte address of a shared-memory
  // pointer (here a made-up one, 1024-byte aligned).
  T* base = reinterpret_cast<T*>(uintptr_t{1} << 20);
  Tensor dst_at = make_tensor(make_smem_ptr(base), typename C::SmemdSt{});
  for (int n = 0; n < C::kBN; ++n)
    for (int m = 0; m < C::kBM; ++m) CHECK(&dst_at(n, m) - base == C::dst_offset(n, m / 8, m % 8));
  const auto q = typename C::SmemQ{};
  const auto qt = typename C::SmemQt{};
  for (int s = 0; s < C::kStages; ++s)
    for (int m = 0; m < C::kBM; ++m)
      for (int d = 0; d < D; d += 5) CHECK(qt(d, m, s) == q(m, d, s));
  const auto k = typename C::SmemKV{};
  const auto kt = typename C::SmemKt{};
  const auto dst = typename C::SmemdSt{};
  const auto ds = typename C::SmemdS{};
  for (int n = 0; n < C::kBN; ++n) {
    for (int d = 0; d < D; d += 5) CHECK(kt(d, n) == k(n, d));
    for (int m = 0; m < C::kBM; ++m) CHECK(ds(m, n) == dst(n, m));
  }
  if (never_true) {
    build_descriptors<typename C::MmaSdP>(k, q);
    build_descriptors<typename C::MmaKV>(_, qt);
    build_descriptors<typename C::MmaQ>(ds, kt);
  }
  const int smem = static_cast<int>(sizeof(T)) * (2 * cosize(k) + 2 * cosize(q) + cosize(dst));
  CHECK(smem + 2048 <= 227 * 1024);
  std::printf("backward D %d: %d bytes of tiles in shared memory\n", D, smem);
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
  check_bwd_config<cutlass::bfloat16_t, 64>();
  check_bwd_config<cutlass::bfloat16_t, 128>();
  TEST_MAIN_END();
}
