// Bindings of the batch-invariant linear layer (csrc/linear): validate the tensors, fill
// llada::LinearParams, pick the stream and call the CPU or CUDA kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "llada/linear.h"

#ifdef LLADA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

constexpr const char* kOp = "linear";

llada::DType linear_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return llada::DType::kFloat32;
    case at::kBFloat16: return llada::DType::kBFloat16;
    case at::kHalf:
      if (!x.is_cuda()) return llada::DType::kFloat16;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, kOp, ": x must be float32, bfloat16 or float16 (float32 or bfloat16 on CUDA), got ",
                       x.scalar_type());
  }
}

Tensor linear(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be [M, K], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kOp, ": weight must be [N, K] with K = ",
                    x.size(1), " (the columns of x), got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), kOp, ": x and weight must have one dtype, got ",
                   x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.device() == weight.device(), kOp, ": x and weight must be on one device, got ", x.device(),
                    " and ", weight.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(M <= INT32_MAX, kOp, ": x must have at most 2^31 - 1 rows, got ", M);
  llada::LinearParams p;
  p.dtype = linear_dtype(x);
  const Tensor xc = x.contiguous();
  const bool rows_in_place = weight.stride(1) == 1 && (N <= 1 || weight.stride(0) >= K);
  const Tensor wc = rows_in_place ? weight : weight.contiguous();
  Tensor out = at::empty({M, N}, x.options());
  p.x = xc.data_ptr();
  p.weight = wc.data_ptr();
  p.out = out.data_ptr();
  p.m = M;
  p.n = N;
  p.k = K;
  p.weight_stride = N > 1 ? wc.stride(0) : K;
  if (x.is_cuda()) {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const llada::Status s = llada::linear_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK_VALUE(s != llada::Status::kBadArgument, kOp,
                      ": on CUDA, bfloat16 needs N, K and the weight's row stride to be multiples of 8 and "
                      "16-byte aligned tensors, got N = ", N, ", K = ", K, " (float32 takes any size)");
    TORCH_CHECK(s == llada::Status::kOk, kOp, ": ", llada::status_string(s));
#else
    TORCH_CHECK(false, kOp, ": llada_engine was built without CUDA kernels");
#endif
    return out;
  }
  p.cpu_isa = llada::cpu_isa_from_env();  // LLADA_CPU_ISA: tests run every CPU path the machine has
  const llada::Status s = llada::linear_cpu(p);
  TORCH_CHECK(s == llada::Status::kOk, kOp, ": ", llada::status_string(s));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("linear", &linear); }

#ifdef LLADA_WITH_CUDA
TORCH_LIBRARY_IMPL(llada, CUDA, m) { m.impl("linear", &linear); }
#endif
