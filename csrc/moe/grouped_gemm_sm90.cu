// The MoE grouped GEMMs on sm_90 (H100/H200): CUTLASS 3.x pointer-array grouped GEMMs with TMA loads
// and warp-specialised schedules (cooperative 128x128 tiles, or ping-pong 64x128 tiles for groups of
// few rows and for every batch-invariant call), bf16 in and out, fp32 accumulation, no split-K.
//
// A small kernel fills each group's problem shape (M, N, K), operand pointers and strides on the
// device from the offsets; the host problem shapes are left null, so nothing is synchronised.
// One instantiation per operand layout: forward (B K-contiguous), dgrad (B N-contiguous) and the
// weight gradient (A = dC^T column-major, B = activations N-contiguous, K = the group's rows).
// Compiled for sm_80 too, where CUTLASS compiles the kernel bodies out; it is only launched on sm_90.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "moe/grouped_gemm_cuda.h"

namespace llada {
namespace moe_cuda {

#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)

namespace {

using namespace cute;
using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
constexpr int kAlignment = 8;                                                  // elements: 16 bytes

using ClusterShape = Shape<_1, _1, _1>;

// Two schedules: cooperative (two consumer warpgroups share a 128x128 tile) for groups of many rows,
// ping-pong (the warpgroups alternate on 64x128 tiles, one's epilogue hiding the other's mainloop) for
// groups of few rows, where a 128-row tile would be mostly empty.
// Every type below is spelled at namespace scope, outside any template: the host compiler rejects
// the builders' decltype-laden types when they appear in a dependent context.
#define LLADA_SM90_SCHEDULE(Schedule, TileM)                                                                     \
  using Schedule##Tile = Shape<TileM, _128, _64>;                                                                 \
  using Schedule##Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                                    \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Schedule##Tile, ClusterShape,                        \
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::RowMajor*,       \
      kAlignment, Element, cutlass::layout::RowMajor*, kAlignment,                                              \
      cutlass::epilogue::PtrArrayTmaWarpSpecialized##Schedule,                                                  \
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;                              \
  using Schedule##Stages = cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(                  \
      sizeof(Schedule##Epilogue::SharedStorage))>;

LLADA_SM90_SCHEDULE(Cooperative, _128)
LLADA_SM90_SCHEDULE(Pingpong, _64)
#undef LLADA_SM90_SCHEDULE

#define LLADA_SM90_GROUPED_GEMM(Name, Schedule, LayoutA, LayoutB)                                              \
  using Name##Mainloop = cutlass::gemm::collective::CollectiveBuilder<                                          \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,    \
      kAlignment, float, Schedule##Tile, ClusterShape, Schedule##Stages,                                        \
      cutlass::gemm::KernelPtrArrayTmaWarpSpecialized##Schedule>::CollectiveOp;                                 \
  struct Name {                                                                                                  \
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Name##Mainloop, Schedule##Epilogue>;       \
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;                                           \
    using StrideA = Kernel::InternalStrideA;                                                                    \
    using StrideB = Kernel::InternalStrideB;                                                                    \
    using StrideD = Kernel::InternalStrideD;                                                                    \
  };

LLADA_SM90_GROUPED_GEMM(ForwardGemm, Cooperative, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor)
LLADA_SM90_GROUPED_GEMM(ForwardNMajorGemm, Cooperative, cutlass::layout::RowMajor, cutlass::layout::RowMajor)
LLADA_SM90_GROUPED_GEMM(WgradGemm, Cooperative, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor)
LLADA_SM90_GROUPED_GEMM(ForwardPingpongGemm, Pingpong, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor)
LLADA_SM90_GROUPED_GEMM(ForwardNMajorPingpongGemm, Pingpong, cutlass::layout::RowMajor, cutlass::layout::RowMajor)
#undef LLADA_SM90_GROUPED_GEMM

// Forward groups of fewer rows than this on average take the ping-pong kernels; batch-invariant calls take
// them always (one kernel, one K order per output element, whatever the rows).
constexpr int64_t kPingpongRows = 64;

// A rank-3 (rows, cols, batch) stride with one unit mode: `ld` goes into the other one.
template <class Stride>
__device__ Stride ld_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(get<0>(s))>>::value) {
    get<1>(s) = ld;
  } else {
    get<0>(s) = ld;
  }
  return s;
}

template <class Cfg>
struct Arrays {
  typename ProblemShape::UnderlyingProblemShape* shapes;  // [E]
  const Element** a;                                       // [E]
  const Element** b;                                       // [E]
  Element** d;                                             // [E]
  typename Cfg::StrideA* stride_a;                         // [E]
  typename Cfg::StrideB* stride_b;                         // [E]
  typename Cfg::StrideD* stride_d;                         // [E]
};

template <class Cfg>
__global__ void setup_kernel(GroupedGemmProblem p, Arrays<Cfg> out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  const int64_t begin = p.offsets ? p.offsets[g] : 0, rows = p.offsets ? p.offsets[g + 1] - begin : p.m;
  const Element* a = static_cast<const Element*>(p.a);
  const Element* b = static_cast<const Element*>(p.b);
  Element* d = static_cast<Element*>(p.d);
  if (p.kind == GemmKind::kWgrad) {  // D[g] [N, K] = dC[rows]^T [N, rows] @ A[rows] [rows, K]
    out.shapes[g] = make_shape(rows ? static_cast<int>(p.n) : 0, static_cast<int>(p.k), static_cast<int>(rows));
    out.a[g] = a + begin * p.n;
    out.b[g] = b + begin * p.k;
    out.d[g] = d + g * p.n * p.k;
    out.stride_a[g] = ld_stride<typename Cfg::StrideA>(p.n);
    out.stride_b[g] = ld_stride<typename Cfg::StrideB>(p.k);
    out.stride_d[g] = ld_stride<typename Cfg::StrideD>(p.k);
  } else {  // D[rows] [rows, N] = A[rows] [rows, K] @ B[g]^T
    out.shapes[g] = make_shape(static_cast<int>(rows), static_cast<int>(p.n), static_cast<int>(p.k));
    out.a[g] = a + begin * p.k;
    out.b[g] = b + g * p.b_stride_group;
    out.d[g] = d + begin * p.n;
    out.stride_a[g] = ld_stride<typename Cfg::StrideA>(p.k);
    out.stride_b[g] = ld_stride<typename Cfg::StrideB>(p.b_ld);
    out.stride_d[g] = ld_stride<typename Cfg::StrideD>(p.n);
  }
}

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <class Cfg>
Status run_gemm(const GroupedGemmProblem& p, cudaStream_t stream) {
  using Gemm = typename Cfg::Gemm;
  const size_t E = static_cast<size_t>(p.groups);
  const size_t sizes[] = {round_up(E * sizeof(typename ProblemShape::UnderlyingProblemShape)), round_up(E * sizeof(void*)),
                          round_up(E * sizeof(void*)), round_up(E * sizeof(void*)),
                          round_up(E * sizeof(typename Cfg::StrideA)), round_up(E * sizeof(typename Cfg::StrideB)),
                          round_up(E * sizeof(typename Cfg::StrideD))};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  char* buffer = nullptr;
  LLADA_RETURN_IF_CUDA_ERROR(cudaMallocAsync(&buffer, total, stream));
  Arrays<Cfg> arrays;
  char* cursor = buffer;
  arrays.shapes = reinterpret_cast<decltype(arrays.shapes)>(cursor);
  cursor += sizes[0];
  arrays.a = reinterpret_cast<const Element**>(cursor);
  cursor += sizes[1];
  arrays.b = reinterpret_cast<const Element**>(cursor);
  cursor += sizes[2];
  arrays.d = reinterpret_cast<Element**>(cursor);
  cursor += sizes[3];
  arrays.stride_a = reinterpret_cast<typename Cfg::StrideA*>(cursor);
  cursor += sizes[4];
  arrays.stride_b = reinterpret_cast<typename Cfg::StrideB*>(cursor);
  cursor += sizes[5];
  arrays.stride_d = reinterpret_cast<typename Cfg::StrideD*>(cursor);
  setup_kernel<Cfg><<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(p, arrays);

  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {_0{}, _0{}, 0};
  fusion.dBeta = {_0{}, _0{}, 0};
  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = p.sm_count;
  args = typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {static_cast<int>(p.groups), arrays.shapes, nullptr},
                                  {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
                                  {fusion, const_cast<const Element**>(arrays.d), arrays.stride_d, arrays.d,
                                   arrays.stride_d},
                                  hw};
  Status status = Status::kOk;
  Gemm gemm;
  void* workspace = nullptr;
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) status = Status::kBadArgument;
  if (status == Status::kOk && workspace_bytes > 0 &&
      cudaMallocAsync(&workspace, workspace_bytes, stream) != cudaSuccess)
    status = Status::kCudaError;
  if (status == Status::kOk && (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess ||
                                gemm.run(stream) != cutlass::Status::kSuccess))
    status = Status::kCudaError;
  if (workspace != nullptr && cudaFreeAsync(workspace, stream) != cudaSuccess) status = Status::kCudaError;
  if (cudaFreeAsync(buffer, stream) != cudaSuccess) status = Status::kCudaError;
  return status;
}

}  // namespace

Status grouped_gemm_sm90(const GroupedGemmProblem& p, cudaStream_t stream) {
  const bool few_rows = p.batch_invariant || p.m < kPingpongRows * p.groups;
  switch (p.kind) {
    case GemmKind::kForward:
      return few_rows ? run_gemm<ForwardPingpongGemm>(p, stream) : run_gemm<ForwardGemm>(p, stream);
    case GemmKind::kForwardNMajor:
      return few_rows ? run_gemm<ForwardNMajorPingpongGemm>(p, stream) : run_gemm<ForwardNMajorGemm>(p, stream);
    case GemmKind::kWgrad: return run_gemm<WgradGemm>(p, stream);
  }
  return Status::kBadArgument;
}

#else

Status grouped_gemm_sm90(const GroupedGemmProblem&, cudaStream_t) { return Status::kNotCompiled; }

#endif

}  // namespace moe_cuda
}  // namespace llada
