// The MoE grouped GEMMs on sm_80..sm_89 (A100, L40, ...): CUTLASS 2.x GemmGrouped with device-only
// scheduling, bf16 in and out, fp32 accumulation, 128x128x32 tensor-core tiles, 4 stages, no split-K
// (one configuration whatever the rows: batch-invariant as it is). Also the
// fp32 grouped GEMMs on every GPU from sm_80 on (this file is compiled for sm_90a too): SIMT tiles.
//
// As on sm_90, a small kernel fills each group's problem size, pointers and leading dimensions on the
// device from the offsets, and the grouped kernel's persistent blocks visit the problems without any
// host-side problem list. One instantiation per operand layout (forward, dgrad, weight gradient).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/gemm/kernel/gemm_grouped.h"
#include "moe/grouped_gemm_cuda.h"

namespace llada {
namespace moe_cuda {

namespace {

template <class LayoutA, class LayoutB>
struct Sm80Gemm {
  using Element = cutlass::bfloat16_t;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, 8, Element, LayoutB, cutlass::ComplexTransform::kNone, 8,
      Element, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

// fp32 on CUDA cores (SIMT, fp32 products and sums as in the CPU reference), any size: 128x128x8 tiles.
template <class LayoutA, class LayoutB>
struct Sm80SimtGemm {
  using Element = float;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, 1, Element, LayoutB, cutlass::ComplexTransform::kNone, 1,
      Element, cutlass::layout::RowMajor, float, cutlass::arch::OpClassSimt, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 8>, cutlass::gemm::GemmShape<32, 64, 8>, cutlass::gemm::GemmShape<1, 1, 1>,
      cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 3,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

template <class Element>
struct Arrays {
  cutlass::gemm::GemmCoord* sizes;  // [E]
  Element** a;                      // [E]
  Element** b;                      // [E]
  Element** d;                      // [E]
  int64_t* lda;                     // [E]
  int64_t* ldb;                     // [E]
  int64_t* ldd;                     // [E]
};

template <class Element>
__global__ void setup_kernel(GroupedGemmProblem p, Arrays<Element> out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  const int64_t begin = p.offsets ? p.offsets[g] : 0, rows = p.offsets ? p.offsets[g + 1] - begin : p.m;
  Element* a = static_cast<Element*>(const_cast<void*>(p.a));
  Element* b = static_cast<Element*>(const_cast<void*>(p.b));
  Element* d = static_cast<Element*>(p.d);
  if (p.kind == GemmKind::kWgrad) {  // D[g] [N, K] = dC[rows]^T [N, rows] @ A[rows] [rows, K]
    out.sizes[g] = cutlass::gemm::GemmCoord(rows ? static_cast<int>(p.n) : 0, static_cast<int>(p.k),
                                            static_cast<int>(rows));
    out.a[g] = a + begin * p.n;
    out.b[g] = b + begin * p.k;
    out.d[g] = d + g * p.n * p.k;
    out.lda[g] = p.n;
    out.ldb[g] = p.k;
    out.ldd[g] = p.k;
  } else {  // D[rows] [rows, N] = A[rows] [rows, K] @ B[g]^T
    out.sizes[g] = cutlass::gemm::GemmCoord(static_cast<int>(rows), static_cast<int>(p.n), static_cast<int>(p.k));
    out.a[g] = a + begin * p.k;
    out.b[g] = b + g * p.b_stride_group;
    out.d[g] = d + begin * p.n;
    out.lda[g] = p.k;
    out.ldb[g] = p.b_ld;
    out.ldd[g] = p.n;
  }
}

template <class Cfg>
Status run_gemm(const GroupedGemmProblem& p, cudaStream_t stream) {
  using Gemm = typename Cfg::Gemm;
  using Element = typename Cfg::Element;
  static const int blocks_per_sm = Gemm::maximum_active_blocks();
  if (blocks_per_sm <= 0) return Status::kCudaError;
  const size_t E = static_cast<size_t>(p.groups);
  const size_t slot = (E * 16 + 255) / 256 * 256;  // room for E entries of up to 16 bytes
  char* buffer = nullptr;
  LLADA_RETURN_IF_CUDA_ERROR(cudaMallocAsync(&buffer, 7 * slot, stream));
  Arrays<Element> arrays;
  arrays.sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(buffer);
  arrays.a = reinterpret_cast<Element**>(buffer + slot);
  arrays.b = reinterpret_cast<Element**>(buffer + 2 * slot);
  arrays.d = reinterpret_cast<Element**>(buffer + 3 * slot);
  arrays.lda = reinterpret_cast<int64_t*>(buffer + 4 * slot);
  arrays.ldb = reinterpret_cast<int64_t*>(buffer + 5 * slot);
  arrays.ldd = reinterpret_cast<int64_t*>(buffer + 6 * slot);
  setup_kernel<Element><<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(p, arrays);

  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
  typename Gemm::Arguments args(arrays.sizes, static_cast<int>(p.groups), blocks_per_sm * p.sm_count, epilogue,
                                arrays.a, arrays.b, arrays.d, arrays.d, arrays.lda, arrays.ldb, arrays.ldd,
                                arrays.ldd);
  Status status = Status::kOk;
  Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess ||
      gemm.run(stream) != cutlass::Status::kSuccess)
    status = Status::kCudaError;
  if (cudaFreeAsync(buffer, stream) != cudaSuccess) status = Status::kCudaError;
  return status;
}

template <template <class, class> class Config>
Status run_kind(const GroupedGemmProblem& p, cudaStream_t stream) {
  switch (p.kind) {
    case GemmKind::kForward:
      return run_gemm<Config<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>>(p, stream);
    case GemmKind::kForwardNMajor:
      return run_gemm<Config<cutlass::layout::RowMajor, cutlass::layout::RowMajor>>(p, stream);
    case GemmKind::kWgrad:
      return run_gemm<Config<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>>(p, stream);
  }
  return Status::kBadArgument;
}

}  // namespace

Status grouped_gemm_sm80(const GroupedGemmProblem& p, cudaStream_t stream) {
  return p.fp32 ? run_kind<Sm80SimtGemm>(p, stream) : run_kind<Sm80Gemm>(p, stream);
}

}  // namespace moe_cuda
}  // namespace llada
