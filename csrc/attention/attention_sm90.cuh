// Tile shapes, shared-memory layouts and accumulator views of the Hopper forward of block attention
// (block_attention_fwd_sm90.cu). Pure CuTe layout algebra, host and device: tests/cpp/test_attention_sm90_layout.cu
// checks on the CPU what the kernel assumes of them (which rows and columns a thread's accumulator holds,
// and that the S accumulator re-read as the A operand of O = P V names the same elements).
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace llada {
namespace attention_sm90 {

using namespace cute;

// One CTA: a producer warpgroup (TMA loads) and two consumer warpgroups, each owning 64 query rows.
template <class T, int D>
struct Config {
  static constexpr int kBM = 128;           // query rows per CTA
  static constexpr int kBN = 128;           // keys per tile
  static constexpr int kStages = 2;         // K/V tiles in flight
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kRowsPerWarpgroup = 64;

  using AtomLayout = Layout<Shape<Int<kBM / 64>, _1, _1>>;
  // S [BM, BN] = Q [BM, D] K [BN, D]^T, both operands from shared memory.
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBM>, Int<kBN>, Int<D>>>(),
                                        AtomLayout{}));
  // O [BM, D] += P [BM, BN] V [BN, D]: P from registers, V read N-major (D contiguous) from shared memory.
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<Int<kBM>, Int<D>, Int<kBN>>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  // 128-byte swizzled rows of D elements, as TMA writes them and wgmma reads them.
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBM>, Int<D>>{}));
  using SmemKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBN>, Int<D>, Int<kStages>>{}));
  // The same V memory seen as [D, BN] per stage: the B operand of O = P V.
  using SmemVt = decltype(composition(
      SmemKV{}, make_ordered_layout(Shape<Int<D>, Int<kBN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  static constexpr int kTileBytes = kBN * D * sizeof(T);  // one K or V stage
  static constexpr int kQBytes = kBM * D * sizeof(T);
};

// An SM90 accumulator fragment ((2, 2, N / 8), M', N') as (row, column): mode 0 of the result is the
// thread's two rows (r and r + 8 of its warp's 16), mode 1 its columns in ascending order.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout l) {
  static_assert(rank_v<decltype(get<0>(l))> == 3, "an SM90 accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same 16-bit data as the A operand of an RS wgmma of K = 16 per instruction: ((2, 2, 2), M', N / 16).
// Valid because the accumulator of a 64 x N tile and the A registers of 64 x 16 blocks place a
// thread's values at the same (row, column) pairs (checked on the CPU).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout l) {
  static_assert(rank_v<decltype(get<0>(l))> == 3, "an SM90 accumulator layout");
  auto split = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N / 16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)), get<1>(l),
                     coalesce(make_layout(get<2, 1>(split), get<2>(l))));
}

}  // namespace attention_sm90
}  // namespace llada
