// The batch-invariant CPU GEMM behind moe_grouped_gemm and linear: C[rows of g] = A[rows of g] @ B[g]^T
// with B K-contiguous (nn.Linear's layout), in which every output element is reduced in one order that
// depends on K, the dtype and the machine's instruction set only, never on how many rows the call or the
// group holds, nor on where a row sits in it. That is what makes a token's result the same alone or in
// any batch.
//
// How: register tiles of kTileRows rows of A x kTileCols rows of B; a group's last tile of rows repeats
// its last row (the repeats are computed and dropped), so every row goes through the same instructions.
//   bf16 with AMX (Sapphire Rapids and later): tiles of 16 rows x 32 K by TDPBF16PS, K in steps of 32.
//   otherwise (fp32, fp16, bf16 without AMX): AVX-512 dot products, 16 fp32 lanes over K (lane l takes
//     K index l mod 16; bf16: a 32-wide step, its even and odd indices in two lane sets), reduced by one
//     fixed tree; or the same with plain C++ loops where AVX-512 is missing.
// Products of bf16 or fp16 inputs are exact in fp32, so accumulation order is the only freedom left.
#pragma once

#include "llada/moe.h"

namespace llada {
namespace moe {

// Runs p (B K-contiguous: p.b_stride_k == 1) on all OpenMP threads. dtype fp32, bf16 or fp16.
void batch_invariant_gemm(const GroupedGemmParams& p);

// Whether batch_invariant_gemm takes the AMX path for p (bf16, K a multiple of 32, AMX usable).
bool batch_invariant_gemm_uses_amx(const GroupedGemmParams& p);

// The AMX path (defined in amx_gemm_cpu.cpp); amx_bf16_usable() asks the CPU and the kernel once.
bool amx_bf16_usable();
void amx_gemm_bf16(const GroupedGemmParams& p);

}  // namespace moe
}  // namespace llada
