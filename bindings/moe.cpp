// Bindings of the mixture-of-experts family (csrc/moe): validate the tensors, fill the llada::Moe*
// and GroupedGemm* params, pick the stream and call the CPU or CUDA kernels. Offsets, ids and the
// inverse index are read on the CPU only (on CUDA they stay on the device: no host sync). The CPU
// grouped GEMM runs the batch-invariant llada kernel, or, when asked for speed only, ATen's GEMM per
// group where that is faster (use_aten).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "llada/moe.h"
#include "validation.h"

#ifdef LLADA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

// fp32 and bf16 everywhere, fp16 too on CUDA.
llada::DType element_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return llada::DType::kFloat32;
    case at::kBFloat16: return llada::DType::kBFloat16;
    case at::kHalf:
      if (t.is_cuda()) return llada::DType::kFloat16;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32 or bfloat16 (or float16 on CUDA), got ",
                       t.scalar_type());
  }
}

// The grouped GEMMs also take fp16 on the CPU.
llada::DType gemm_dtype(const Tensor& t, const char* op, const char* name) {
  if (t.scalar_type() == at::kHalf) return llada::DType::kFloat16;
  return element_dtype(t, op, name);
}

// The CUDA grouped GEMMs: bf16 with rows of 16 bytes (sizes multiples of 8) for TMA / cp.async, or fp32.
void check_cuda_gemm(const Tensor& t, int64_t n, int64_t k, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be bfloat16 or float32 on CUDA, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || (n % 8 == 0 && k % 8 == 0), op,
                    ": in bfloat16 on CUDA the sizes N and K must be multiples of 8, got N = ", n, ", K = ", k);
}

#ifdef LLADA_WITH_CUDA
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#else
[[noreturn]] void no_cuda(const char* op) { TORCH_CHECK(false, op, ": llada_engine was built without CUDA kernels"); }
#endif

void check_int32(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* name_a, const char* name_b) {
  llada::bindings::check_same_device(op, {{name_a, &a}, {name_b, &b}});
}

void check_status(llada::Status s, const char* op, const char* what) {
  TORCH_CHECK_VALUE(s != llada::Status::kBadArgument, op, ": ", what);
  TORCH_CHECK(s == llada::Status::kOk, op, ": ", llada::status_string(s));
}

// offsets int32 [E + 1]: 0 at the start, non-decreasing, `m` at the end (values read on the CPU only,
// through their stride).
void check_offsets(const Tensor& offsets, int64_t groups, int64_t m, const char* op) {
  check_int32(offsets, op, "offsets");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == groups + 1, op, ": offsets must be [E + 1] = [",
                    groups + 1, "], got shape ", offsets.sizes());
  if (offsets.is_cuda()) return;
  const llada::bindings::HostValues<int32_t> v(offsets);
  TORCH_CHECK_VALUE(v[0] == 0, op, ": offsets must start at 0, got ", v[0]);
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK_VALUE(v[g + 1] >= v[g], op, ": offsets must be non-decreasing, got offsets[", g, "] = ", v[g],
                      " > offsets[", g + 1, "] = ", v[g + 1]);
  TORCH_CHECK_VALUE(v[groups] == m, op, ": offsets must end at M = ", m, " (the rows of the input), got ", v[groups]);
}

std::tuple<Tensor, Tensor> moe_route(const Tensor& router_logits, const std::optional<Tensor>& expert_bias,
                                     int64_t top_k, int64_t n_group, int64_t topk_group,
                                     double routed_scaling_factor, bool norm_topk_prob) {
  constexpr const char* op = "moe_route";
  llada::bindings::check_defined(op, {{"router_logits", &router_logits}});
  TORCH_CHECK_VALUE(router_logits.dim() == 2, op, ": router_logits must be [T, E], got shape ", router_logits.sizes());
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  llada::MoeRouteParams p;
  switch (router_logits.scalar_type()) {
    case at::kFloat: p.logits_dtype = llada::DType::kFloat32; break;
    case at::kBFloat16: p.logits_dtype = llada::DType::kBFloat16; break;
    case at::kHalf: p.logits_dtype = llada::DType::kFloat16; break;
    default:
      TORCH_CHECK_TYPE(false, op, ": router_logits must be float32, bfloat16 or float16, got ",
                       router_logits.scalar_type());
  }
  TORCH_CHECK_VALUE(E >= 1, op, ": router_logits must have at least one expert, got E = ", E);
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, op, ": n_group must divide the number of experts E = ", E,
                    ", got ", n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, op, ": topk_group must be in [1, n_group] = [1, ",
                    n_group, "], got ", topk_group);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, E] = [1, ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(top_k <= topk_group * (E / n_group), op, ": top_k = ", top_k,
                    " exceeds the experts of the kept groups, topk_group * E / n_group = ", topk_group * (E / n_group));
  llada::bindings::check_float32_finite(op, "routed_scaling_factor", routed_scaling_factor);
  Tensor logits = router_logits.contiguous();
  Tensor bias;
  if (expert_bias.has_value()) {
    bias = expert_bias->contiguous();
    TORCH_CHECK_TYPE(bias.scalar_type() == at::kFloat, op, ": expert_bias must be float32, got ", bias.scalar_type());
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == E, op, ": expert_bias must be [E] = [", E, "], got shape ",
                      bias.sizes());
    check_same_device(logits, bias, op, "router_logits", "expert_bias");
  }
  Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  p.logits = logits.data_ptr();
  p.expert_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.topk_ids = ids.data_ptr<int32_t>();
  p.topk_weights = weights.data_ptr<float>();
  p.tokens = T;
  p.experts = E;
  p.top_k = top_k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  p.norm_topk_prob = norm_topk_prob;
  if (logits.is_cuda()) {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    check_status(llada::moe_route_cuda(p, current_stream()), op, "too many experts for the CUDA kernel");
#else
    no_cuda(op);
#endif
    return {ids, weights};
  }
  check_status(llada::moe_route_cpu(p), op, "bad routing configuration");
  return {ids, weights};
}

std::tuple<Tensor, Tensor, Tensor> moe_permute(const Tensor& x, const Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "moe_permute";
  llada::bindings::check_defined(op, {{"x", &x}, {"topk_ids", &topk_ids}});
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [T, H], got shape ", x.sizes());
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0), op, ": topk_ids must be [T, k] with T = ",
                    x.size(0), ", got shape ", topk_ids.sizes());
  check_int32(topk_ids, op, "topk_ids");
  check_same_device(x, topk_ids, op, "x", "topk_ids");
  TORCH_CHECK_VALUE(topk_ids.size(1) >= 1, op, ": topk_ids must have k >= 1 columns");
  llada::bindings::check_int32_range(op, "num_experts", num_experts, 1);
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1);
  TORCH_CHECK_VALUE(T * k <= INT32_MAX, op, ": T * k must fit in int32, got ", T * k);
  llada::MoePermuteParams p;
  p.dtype = element_dtype(x, op, "x");
  Tensor xc = x.contiguous(), ids = topk_ids.contiguous();
  Tensor x_sorted = at::empty({T * k, H}, x.options());
  Tensor offsets = at::empty({num_experts + 1}, ids.options());
  Tensor inverse = at::empty({T * k}, ids.options());
  p.x = xc.data_ptr();
  p.topk_ids = ids.data_ptr<int32_t>();
  p.x_sorted = x_sorted.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.inverse = inverse.data_ptr<int32_t>();
  p.tokens = T;
  p.hidden = H;
  p.top_k = k;
  p.experts = num_experts;
  if (x.is_cuda()) {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_status(llada::moe_permute_cuda(p, current_stream()), op, "num_experts too large for the CUDA kernel");
#else
    no_cuda(op);
#endif
    return {x_sorted, offsets, inverse};
  }
  const llada::Status s = llada::moe_permute_cpu(p);
  const int32_t* v = ids.data_ptr<int32_t>();
  for (int64_t i = 0; s == llada::Status::kBadArgument && i < T * k; ++i)
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < num_experts, op, ": topk_ids must lie in [0, num_experts = ", num_experts,
                      "), got topk_ids[", i / k, ", ", i % k, "] = ", v[i]);
  check_status(s, op, "topk_ids must lie in [0, num_experts)");
  return {x_sorted, offsets, inverse};
}

void check_unpermute_args(const Tensor& y, const Tensor& inverse, const Tensor& topk_weights, const char* op) {
  llada::bindings::check_defined(op, {{"y", &y}, {"inverse", &inverse}, {"topk_weights", &topk_weights}});
  TORCH_CHECK_VALUE(y.dim() == 2, op, ": y must be [T * k, H], got shape ", y.sizes());
  TORCH_CHECK_VALUE(topk_weights.dim() == 2 && topk_weights.size(1) >= 1, op,
                    ": topk_weights must be [T, k] with k >= 1, got shape ", topk_weights.sizes());
  TORCH_CHECK_TYPE(topk_weights.scalar_type() == at::kFloat, op, ": topk_weights must be float32, got ",
                   topk_weights.scalar_type());
  check_int32(inverse, op, "inverse");
  const int64_t rows = topk_weights.size(0) * topk_weights.size(1);
  TORCH_CHECK_VALUE(inverse.dim() == 1 && inverse.size(0) == rows, op, ": inverse must be [T * k] = [", rows,
                    "], got shape ", inverse.sizes());
  TORCH_CHECK_VALUE(y.size(0) == rows, op, ": y must have T * k = ", rows, " rows, got ", y.size(0));
  check_same_device(y, inverse, op, "y", "inverse");
  check_same_device(y, topk_weights, op, "y", "topk_weights");
}

Tensor moe_unpermute(const Tensor& y, const Tensor& inverse, const Tensor& topk_weights) {
  constexpr const char* op = "moe_unpermute";
  check_unpermute_args(y, inverse, topk_weights, op);
  const int64_t T = topk_weights.size(0), k = topk_weights.size(1), H = y.size(1);
  llada::MoeUnpermuteParams p;
  p.dtype = element_dtype(y, op, "y");
  Tensor yc = y.contiguous(), inv = inverse.contiguous(), w = topk_weights.contiguous();
  Tensor out = at::empty({T, H}, y.options());
  p.y = yc.data_ptr();
  p.inverse = inv.data_ptr<int32_t>();
  p.topk_weights = w.data_ptr<float>();
  p.out = out.data_ptr();
  p.tokens = T;
  p.hidden = H;
  p.top_k = k;
  p.rows = y.size(0);
  if (y.is_cuda()) {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    check_status(llada::moe_unpermute_cuda(p, current_stream()), op, "bad sizes");
#else
    no_cuda(op);
#endif
    return out;
  }
  check_status(llada::moe_unpermute_cpu(p), op, "inverse must lie in [0, T * k)");
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_out, const Tensor& y, const Tensor& inverse,
                                                  const Tensor& topk_weights) {
  constexpr const char* op = "moe_unpermute_backward";
  llada::bindings::check_defined(op, {{"grad_out", &grad_out}});
  check_unpermute_args(y, inverse, topk_weights, op);
  const int64_t T = topk_weights.size(0), k = topk_weights.size(1), H = y.size(1);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H, op,
                    ": grad_out must be [T, H] = [", T, ", ", H, "], got shape ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == y.scalar_type(), op, ": grad_out must have the dtype of y (",
                   y.scalar_type(), "), got ", grad_out.scalar_type());
  check_same_device(y, grad_out, op, "y", "grad_out");
  llada::MoeUnpermuteBackwardParams p;
  p.dtype = element_dtype(y, op, "y");
  Tensor g = grad_out.contiguous(), yc = y.contiguous(), inv = inverse.contiguous(), w = topk_weights.contiguous();
  Tensor grad_y = at::empty_like(yc);
  Tensor grad_w = at::empty({T, k}, w.options());
  p.grad_out = g.data_ptr();
  p.y = yc.data_ptr();
  p.inverse = inv.data_ptr<int32_t>();
  p.topk_weights = w.data_ptr<float>();
  p.grad_y = grad_y.data_ptr();
  p.grad_weights = grad_w.data_ptr<float>();
  p.tokens = T;
  p.hidden = H;
  p.top_k = k;
  p.rows = y.size(0);
  if (y.is_cuda()) {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    check_status(llada::moe_unpermute_backward_cuda(p, current_stream()), op, "bad sizes");
#else
    no_cuda(op);
#endif
    return {grad_y, grad_w};
  }
  check_status(llada::moe_unpermute_backward_cpu(p), op, "inverse must be a permutation of [0, T * k)");
  return {grad_y, grad_w};
}

// The same products through ATen's CPU GEMM (oneDNN / BLAS), one call per non-empty group.
void grouped_gemm_aten(const Tensor& a, const Tensor& b, const Tensor& offsets, Tensor& c) {
  const Tensor o = offsets.cpu();
  const int32_t* v = o.data_ptr<int32_t>();
  for (int64_t g = 0; g < b.size(0); ++g) {
    if (v[g + 1] == v[g]) continue;
    Tensor rows = c.narrow(0, v[g], v[g + 1] - v[g]);
    at::mm_out(rows, a.narrow(0, v[g], v[g + 1] - v[g]), b[g].t());
  }
}

void grouped_gemm_wgrad_aten(const Tensor& grad_out, const Tensor& a, const Tensor& offsets, Tensor& grad_b) {
  const Tensor o = offsets.cpu();
  const int32_t* v = o.data_ptr<int32_t>();
  for (int64_t g = 0; g < grad_b.size(0); ++g) {
    Tensor out = grad_b[g];
    if (v[g + 1] == v[g]) {
      out.zero_();
      continue;
    }
    at::mm_out(out, grad_out.narrow(0, v[g], v[g + 1] - v[g]).t(), a.narrow(0, v[g], v[g + 1] - v[g]));
  }
}

// Which CPU GEMM runs the grouped products when they need not be batch-invariant (the llada kernels are
// batch-invariant by construction; ATen's GEMM picks its kernel by shape). LLADA_MOE_CPU_GEMM=kernel|aten
// forces one (the tests run both). By default: ATen (MKL / oneDNN) for the forward of groups of more than
// kAtenRows rows on average and for the bf16 weight gradient, the llada kernels for few rows (decoding:
// they stream each weight row once, where ATen pays a call per group) and the fp32 weight gradient.
constexpr int64_t kAtenRows = 16;

bool use_aten(const Tensor& a, bool few_rows) {
  const char* force = std::getenv("LLADA_MOE_CPU_GEMM");
  if (force != nullptr && std::strcmp(force, "kernel") == 0) return false;
  if (force != nullptr && std::strcmp(force, "aten") == 0) return true;
  return !few_rows;
}

Tensor moe_grouped_gemm(const Tensor& a, const Tensor& b, const Tensor& offsets, bool batch_invariant) {
  constexpr const char* op = "moe_grouped_gemm";
  llada::bindings::check_defined(op, {{"a", &a}, {"b", &b}, {"offsets", &offsets}});
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": a must be [M, K], got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 3, op, ": b must be [E, N, K], got shape ", b.sizes());
  TORCH_CHECK_VALUE(b.size(2) == a.size(1), op, ": b must be [E, N, K] with K = ", a.size(1),
                    " (the columns of a), got shape ", b.sizes());
  TORCH_CHECK_VALUE(b.size(0) >= 1, op, ": b must hold at least one group");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": a and b must have one dtype, got ", a.scalar_type(),
                   " and ", b.scalar_type());
  check_same_device(a, b, op, "a", "b");
  check_same_device(a, offsets, op, "a", "offsets");
  const int64_t M = a.size(0), K = a.size(1), E = b.size(0), N = b.size(1);
  check_offsets(offsets, E, M, op);
  llada::GroupedGemmParams p;
  p.dtype = gemm_dtype(a, op, "a");
  Tensor ac = a.contiguous();
  Tensor bc = (b.stride(2) == 1 || b.stride(1) == 1) ? b : b.contiguous();
  Tensor oc = offsets.contiguous();
  Tensor c = at::empty({M, N}, a.options());
  p.a = ac.data_ptr();
  p.b = bc.data_ptr();
  p.offsets = oc.data_ptr<int32_t>();
  p.c = c.data_ptr();
  p.m = M;
  p.n = N;
  p.k = K;
  p.groups = E;
  p.b_stride_group = bc.stride(0);
  p.b_stride_n = bc.stride(1);
  p.b_stride_k = bc.stride(2);
  p.batch_invariant = batch_invariant;
  p.cpu_isa = llada::cpu_isa_from_env();  // LLADA_CPU_ISA: tests run every CPU path the machine has
  if (a.is_cuda()) {
    check_cuda_gemm(a, N, K, op, "a");
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(a.device());
    check_status(llada::moe_grouped_gemm_cuda(p, current_stream()), op,
                 "b must be contiguous in N or K with 16-byte aligned rows and groups, on an sm_80/sm_90 GPU");
#else
    no_cuda(op);
#endif
    return c;
  }
  if (!batch_invariant && use_aten(ac, M <= kAtenRows * E)) {
    grouped_gemm_aten(ac, bc, oc, c);
    return c;
  }
  check_status(llada::moe_grouped_gemm_cpu(p), op, "bad offsets");
  return c;
}

Tensor moe_grouped_gemm_wgrad(const Tensor& grad_out, const Tensor& a, const Tensor& offsets) {
  constexpr const char* op = "moe_grouped_gemm_wgrad";
  llada::bindings::check_defined(op, {{"grad_out", &grad_out}, {"a", &a}, {"offsets", &offsets}});
  TORCH_CHECK_VALUE(grad_out.dim() == 2, op, ": grad_out must be [M, N], got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == grad_out.size(0), op, ": a must be [M, K] with M = ",
                    grad_out.size(0), ", got shape ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == grad_out.scalar_type(), op, ": grad_out and a must have one dtype, got ",
                   grad_out.scalar_type(), " and ", a.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2, op,
                    ": offsets must be [E + 1] with E >= 1, got shape ", offsets.sizes());
  check_same_device(a, grad_out, op, "a", "grad_out");
  check_same_device(a, offsets, op, "a", "offsets");
  const int64_t M = a.size(0), K = a.size(1), N = grad_out.size(1), E = offsets.size(0) - 1;
  check_offsets(offsets, E, M, op);
  llada::GroupedGemmWgradParams p;
  p.dtype = gemm_dtype(a, op, "a");
  Tensor gc = grad_out.contiguous(), ac = a.contiguous(), oc = offsets.contiguous();
  Tensor grad_b = at::empty({E, N, K}, a.options());
  p.grad_c = gc.data_ptr();
  p.a = ac.data_ptr();
  p.offsets = oc.data_ptr<int32_t>();
  p.grad_b = grad_b.data_ptr();
  p.m = M;
  p.n = N;
  p.k = K;
  p.groups = E;
  if (a.is_cuda()) {
    check_cuda_gemm(a, N, K, op, "a");
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(a.device());
    check_status(llada::moe_grouped_gemm_wgrad_cuda(p, current_stream()), op, "needs an sm_80/sm_90 GPU");
#else
    no_cuda(op);
#endif
    return grad_b;
  }
  if (use_aten(ac, ac.scalar_type() != at::kBFloat16)) {
    grouped_gemm_wgrad_aten(gc, ac, oc, grad_b);
    return grad_b;
  }
  check_status(llada::moe_grouped_gemm_wgrad_cpu(p), op, "bad offsets");
  return grad_b;
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("moe_route", &moe_route);
  m.impl("moe_permute", &moe_permute);
  m.impl("moe_unpermute", &moe_unpermute);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm);
  m.impl("moe_grouped_gemm_wgrad", &moe_grouped_gemm_wgrad);
}

#ifdef LLADA_WITH_CUDA
TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("moe_route", &moe_route);
  m.impl("moe_permute", &moe_permute);
  m.impl("moe_unpermute", &moe_unpermute);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm);
  m.impl("moe_grouped_gemm_wgrad", &moe_grouped_gemm_wgrad);
}
#endif
