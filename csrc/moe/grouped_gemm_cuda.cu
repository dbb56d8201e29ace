// CUDA entry points of the grouped GEMM (docs/ARCHITECTURE.md, Mixture of experts): checks what the kernels need, picks
// the kind (forward with a K- or N-contiguous B, or weight gradient) and the architecture (CUTLASS 3.x
// pointer-array on sm_90, CUTLASS 2.x GemmGrouped on sm_80..sm_89), and zero-fills what no tile writes.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "common/cuda_check.h"
#include "llada/moe.h"
#include "moe/grouped_gemm_cuda.h"

namespace llada {

namespace {

struct DeviceInfo {
  int major = 0;
  int sm_count = 0;
};

Status device_info(int* device, DeviceInfo* info) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  LLADA_RETURN_IF_CUDA_ERROR(cudaGetDevice(device));
  if (*device >= kMaxDevices) return Status::kBadArgument;
  DeviceInfo& c = cache[*device];
  if (c.sm_count == 0) {
    LLADA_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, *device));
    LLADA_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&c.sm_count, cudaDevAttrMultiProcessorCount, *device));
  }
  *info = c;
  return Status::kOk;
}

// grad_b[g] = 0 for the groups without rows (their GEMM has no tile), in 16-bit words.
__global__ void zero_empty_groups_kernel(const int32_t* offsets, int64_t group_elems, uint16_t* grad_b) {
  const int64_t g = blockIdx.y;
  if (offsets[g + 1] != offsets[g]) return;
  uint16_t* out = grad_b + g * group_elems;  // [N, K]
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < group_elems;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = 0;
}

Status run(moe_cuda::GroupedGemmProblem& q, cudaStream_t stream) {
  DeviceInfo info;
  const Status s = device_info(&q.device, &info);
  if (s != Status::kOk) return s;
  q.sm_count = info.sm_count;
  if (info.major == 9 && !q.fp32) return moe_cuda::grouped_gemm_sm90(q, stream);
  if (info.major == 8 || info.major == 9) return moe_cuda::grouped_gemm_sm80(q, stream);
  return Status::kNotCompiled;
}

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

// bf16 needs 16-byte rows and bases (TMA, cp.async); fp32 (SIMT kernels) takes any size.
bool supported(DType dtype, int64_t n, int64_t k, std::initializer_list<const void*> pointers) {
  if (dtype == DType::kFloat32) return true;
  if (dtype != DType::kBFloat16 || n % 8 != 0 || k % 8 != 0) return false;
  for (const void* ptr : pointers)
    if (!aligned(ptr)) return false;
  return true;
}

Status moe_grouped_gemm_cuda(const GroupedGemmParams& p, cudaStream_t stream) {
  const bool fp32 = p.dtype == DType::kFloat32;
  if (p.m < 0 || p.groups < 1 || !supported(p.dtype, p.n, p.k, {p.a, p.b, p.c}) ||
      (!fp32 && p.b_stride_group % 8 != 0))
    return Status::kBadArgument;
  moe_cuda::GroupedGemmProblem q;
  if (p.b_stride_k == 1) {
    q.kind = moe_cuda::GemmKind::kForward;
    q.b_ld = p.b_stride_n;
  } else if (p.b_stride_n == 1) {
    q.kind = moe_cuda::GemmKind::kForwardNMajor;
    q.b_ld = p.b_stride_k;
  } else {
    return Status::kBadArgument;
  }
  if (!fp32 && q.b_ld % 8 != 0) return Status::kBadArgument;
  if (p.m == 0 || p.n == 0) return Status::kOk;
  if (p.k == 0) {
    LLADA_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.c, 0, p.m * p.n * (fp32 ? 4 : 2), stream));
    return Status::kOk;
  }
  q.fp32 = fp32;
  q.a = p.a;
  q.b = p.b;
  q.offsets = p.offsets;
  q.d = p.c;
  q.m = p.m;
  q.n = p.n;
  q.k = p.k;
  q.groups = p.groups;
  q.b_stride_group = p.b_stride_group;
  return run(q, stream);
}

Status moe_grouped_gemm_wgrad_cuda(const GroupedGemmWgradParams& p, cudaStream_t stream) {
  const bool fp32 = p.dtype == DType::kFloat32;
  if (p.m < 0 || p.groups < 1 || !supported(p.dtype, p.n, p.k, {p.grad_c, p.a, p.grad_b}))
    return Status::kBadArgument;
  const int64_t group_elems = p.n * p.k * (fp32 ? 2 : 1);  // in 16-bit words
  if (group_elems == 0) return Status::kOk;
  const dim3 grid(static_cast<unsigned>(group_elems < 256 * 64 ? (group_elems + 255) / 256 : 64),
                  static_cast<unsigned>(p.groups));
  zero_empty_groups_kernel<<<grid, 256, 0, stream>>>(p.offsets, group_elems, static_cast<uint16_t*>(p.grad_b));
  LLADA_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  if (p.m == 0) return Status::kOk;
  moe_cuda::GroupedGemmProblem q;
  q.kind = moe_cuda::GemmKind::kWgrad;
  q.fp32 = fp32;
  q.a = p.grad_c;
  q.b = p.a;
  q.offsets = p.offsets;
  q.d = p.grad_b;
  q.m = p.m;
  q.n = p.n;
  q.k = p.k;
  q.groups = p.groups;
  return run(q, stream);
}

}  // namespace llada
