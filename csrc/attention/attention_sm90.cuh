// Tile shapes, shared-memory layouts and accumulator views of the Hopper forward and backward of block
// attention (block_attention_fwd_sm90.cu, block_attention_bwd_sm90.cu). Pure CuTe layout algebra, host and
// device: tests/cpp/test_attention_sm90_layout.cu checks on the CPU what the kernels assume of them (which rows
// and columns a thread's accumulator holds, that an accumulator re-read as the A operand of the next GEMM
// names the same elements, and that every transposed view is the same memory).
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

// Backward. One CTA: a producer warpgroup and two consumer warpgroups, 128 keys of one kv head (64 per consumer
// warpgroup), walking the query tiles (64 rows) of every query head of the GQA group.
template <class T, int D>
struct BwdConfig {
  static constexpr int kBM = 64;            // query rows per tile
  static constexpr int kBN = 128;           // keys per CTA
  static constexpr int kStages = 2;         // Q/dO tiles in flight
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kKeysPerWarpgroup = 64;

  using AtomLayoutKeys = Layout<Shape<_2, _1, _1>>;
  // S^T [BN, BM] = K Q^T and dP^T = V dO^T: both operands from shared memory, rows split over the warpgroups.
  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBN>, Int<kBM>, Int<D>>>(),
                                         AtomLayoutKeys{}));
  // dV [BN, D] += P^T dO and dK += dS^T Q: P^T / dS^T from registers, dO / Q read N-major (D contiguous).
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<Int<kBN>, Int<D>, Int<kBM>>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutKeys{}));
  // dQ [BM, D] = dS K: dS read M-major from the dS^T tile, K read N-major; the warpgroups split D.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBM>, Int<D / 2>, Int<kBN>>, GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));

  using SmemKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBN>, Int<D>>{}));
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBM>, Int<D>, Int<kStages>>{}));
  // Q and dO seen as [D, BM] per stage: the B operand of dK and dV.
  using SmemQt = decltype(composition(
      SmemQ{}, make_ordered_layout(Shape<Int<D>, Int<kBM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // K seen as [D, BN]: the B operand of dQ.
  using SmemKt = decltype(composition(SmemKV{}, make_ordered_layout(Shape<Int<D>, Int<kBN>>{}, Step<_2, _1>{})));
  // dS^T [BN, BM] as the consumers write it, and seen as dS [BM, BN]: the A operand of dQ.
  using SmemdSt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBN>, Int<kBM>>{}));
  using SmemdS = decltype(composition(SmemdSt{}, make_ordered_layout(Shape<Int<kBM>, Int<kBN>>{}, Step<_2, _1>{})));

  static constexpr int kKVBytes = kBN * D * sizeof(T);  // K or V
  static constexpr int kQBytes = kBM * D * sizeof(T);   // one stage of Q or dO
  static_assert(kBM * sizeof(T) == 128, "dS^T rows are one 128-byte swizzle row (dst_offset)");

  // Element offset of dS^T (key n, query m = 8 chunk + within) in SmemdSt from a 1024-byte aligned base: the
  // 128-byte swizzle XORs the 16-byte chunk index of a row with the row's index mod 8.
  CUTE_HOST_DEVICE static constexpr int dst_offset(int n, int chunk, int within) {
    return n * kBM + 8 * (chunk ^ (n & 7)) + within;
  }
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
