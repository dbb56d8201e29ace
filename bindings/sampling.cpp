// Bindings of the parallel token-commit family (csrc/sampling): validate the tensors, fill
// llada::CommitTokensParams, pick the stream and call the CPU or CUDA kernel. commit_tokens takes its
// sampling parameters as scalars; commit_tokens_per_seq as [B] tensors, one value per sequence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "llada/sampling.h"
#include "validation.h"

#ifdef LLADA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

llada::DType logits_dtype(const Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return llada::DType::kFloat32;
    case at::kBFloat16: return llada::DType::kBFloat16;
    case at::kHalf: return llada::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "commit_tokens: logits must be float32, bfloat16 or float16, got ",
                       logits.scalar_type());
  }
}

std::string temperature_too_small(double temperature) {
  return c10::str("commit_tokens: temperature = ", temperature, " is too small for these logits: logits / temperature ",
                  "overflows float32 (temperature 0 decodes greedily)");
}

// The error of a row the kernel could propose nothing from (kNanInput): NaN logits, a row whose maximum is
// not finite, or else a temperature so small that logits / temperature overflows float32.
[[noreturn]] void raise_non_finite(const Tensor& logits, double temperature) {
  TORCH_CHECK_VALUE(!at::isnan(logits).any().item<bool>(), "commit_tokens: logits contain NaN");
  const Tensor bad = at::isfinite(at::amax(logits, -1)).logical_not();
  if (bad.any().item<bool>()) {
    const Tensor where = bad.nonzero()[0].cpu();
    TORCH_CHECK_VALUE(false, "commit_tokens: logits[", where[0].item<int64_t>(), ", ", where[1].item<int64_t>(),
                      "] has no finite maximum (a +inf logit, or every logit -inf)");
  }
  TORCH_CHECK_VALUE(false, temperature_too_small(temperature));
}

llada::CommitTokensParams make_params(const Tensor& tokens, const Tensor& logits, const Tensor& min_commit,
                                      int64_t mask_id, double threshold, double temperature, int64_t top_k,
                                      double top_p, int64_t seed, int64_t offset) {
  llada::bindings::check_defined("commit_tokens",
                                 {{"tokens", &tokens}, {"logits", &logits}, {"min_commit", &min_commit}});
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "commit_tokens: tokens must be int64, got ",
                   tokens.scalar_type());
  TORCH_CHECK_TYPE(min_commit.scalar_type() == at::kInt, "commit_tokens: min_commit must be int32, got ",
                   min_commit.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 2, "commit_tokens: tokens must be [B, L], got shape ", tokens.sizes());
  TORCH_CHECK_VALUE(logits.dim() == 3, "commit_tokens: logits must be [B, L, V], got shape ", logits.sizes());
  const int64_t B = tokens.size(0), L = tokens.size(1), V = logits.size(2);
  TORCH_CHECK_VALUE(logits.size(0) == B && logits.size(1) == L, "commit_tokens: logits shape ",
                    logits.sizes(), " does not match tokens shape ", tokens.sizes());
  TORCH_CHECK_VALUE(V >= 1, "commit_tokens: logits must have a vocabulary of at least 1, got V = ", V);
  TORCH_CHECK_VALUE(min_commit.dim() == 1 && min_commit.size(0) == B,
                    "commit_tokens: min_commit must be [B] = [", B, "], got shape ", min_commit.sizes());
  llada::bindings::check_same_device("commit_tokens",
                                     {{"tokens", &tokens}, {"logits", &logits}, {"min_commit", &min_commit}});
  TORCH_CHECK_VALUE(tokens.is_contiguous(), "commit_tokens: tokens must be contiguous");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "commit_tokens: logits must be contiguous");
  TORCH_CHECK_VALUE(min_commit.is_contiguous(), "commit_tokens: min_commit must be contiguous");
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < V, "commit_tokens: mask_id must be in [0, V) = [0, ", V,
                    "), got ", mask_id);
  TORCH_CHECK_VALUE(threshold >= 0.0 && threshold <= 1.0, "commit_tokens: threshold must be in [0, 1], got ",
                    threshold);
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(temperature)) && temperature >= 0.0,
                    "commit_tokens: temperature must be finite and >= 0 (in float32), got ", temperature);
  TORCH_CHECK_VALUE(temperature == 0.0 || static_cast<float>(temperature) > 0.0f, temperature_too_small(temperature));
  TORCH_CHECK_VALUE(top_k >= 0, "commit_tokens: top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "commit_tokens: top_p must be in (0, 1], got ", top_p);

  llada::CommitTokensParams p;
  p.tokens = tokens.data_ptr<int64_t>();
  p.logits = logits.data_ptr();
  p.logits_dtype = logits_dtype(logits);
  p.min_commit = min_commit.data_ptr<int32_t>();
  p.batch = B;
  p.block = L;
  p.vocab = V;
  p.mask_id = mask_id;
  p.threshold = static_cast<float>(threshold);
  p.temperature = static_cast<float>(temperature);
  p.top_k = top_k;
  p.top_p = static_cast<float>(top_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  return p;
}

// Runs the commit kernel of the tokens' device on filled-in Params (the CUDA one asynchronously).
llada::Status run_commit(llada::CommitTokensParams& p, const Tensor& tokens, const Tensor& min_commit) {
  if (tokens.is_cpu()) {
    if (p.batch > 0) {
      const int32_t min_value = min_commit.min().item<int32_t>();
      TORCH_CHECK_VALUE(min_value >= 0, "commit_tokens: min_commit must be >= 0, got ", min_value);
    }
    return llada::commit_tokens_cpu(p);
  }
#ifdef LLADA_WITH_CUDA
  TORCH_CHECK_VALUE(p.vocab < (int64_t{1} << 24), "commit_tokens: logits vocabulary must be below 2^24 on CUDA, got ",
                    p.vocab);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const Tensor workspace =
      at::empty({llada::commit_tokens_cuda_workspace_bytes(p)}, tokens.options().dtype(at::kByte));
  p.workspace = workspace.numel() > 0 ? workspace.data_ptr() : nullptr;
  return llada::commit_tokens_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
#else
  TORCH_CHECK(false, "commit_tokens: llada_engine was built without CUDA kernels");
#endif
}

std::tuple<Tensor, Tensor, Tensor> commit_tokens_inplace(Tensor tokens, const Tensor& logits,
                                                         const Tensor& min_commit, int64_t mask_id,
                                                         double threshold, double temperature, int64_t top_k,
                                                         double top_p, int64_t seed, int64_t offset) {
  llada::CommitTokensParams p =
      make_params(tokens, logits, min_commit, mask_id, threshold, temperature, top_k, top_p, seed, offset);
  Tensor committed = at::empty(tokens.sizes(), tokens.options().dtype(at::kBool));
  Tensor confidence = at::empty(tokens.sizes(), tokens.options().dtype(at::kFloat));
  Tensor candidates = at::empty(tokens.sizes(), tokens.options());
  p.committed = committed.data_ptr<bool>();
  p.confidence = confidence.data_ptr<float>();
  p.candidates = candidates.data_ptr<int64_t>();

  const llada::Status s = run_commit(p, tokens, min_commit);
  if (s == llada::Status::kNanInput) raise_non_finite(logits, temperature);
  TORCH_CHECK(s == llada::Status::kOk, "commit_tokens: ", llada::status_string(s));
  return {committed, confidence, candidates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> commit_tokens(const Tensor& tokens, const Tensor& logits,
                                                         const Tensor& min_commit, int64_t mask_id,
                                                         double threshold, double temperature, int64_t top_k,
                                                         double top_p, int64_t seed, int64_t offset) {
  llada::bindings::check_defined("commit_tokens", {{"tokens", &tokens}});
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "commit_tokens: tokens must be int64, got ",
                   tokens.scalar_type());
  Tensor out = tokens.contiguous().clone();
  auto [committed, confidence, candidates] = commit_tokens_inplace(out, logits, min_commit, mask_id, threshold,
                                                                   temperature, top_k, top_p, seed, offset);
  return {out, committed, confidence, candidates};
}

// --- Per-sequence parameters ---------------------------------------------------------------------------------

// The [B] parameter tensors of commit_tokens_per_seq, where the kernel reads them.
struct PerSequenceTensors {
  Tensor threshold, temperature, top_k, top_p, seed, offset;
};

// One per-sequence parameter: `dtype` [B], on the tokens' device or the CPU (made contiguous where the kernel
// reads it).
void check_per_seq(const Tensor& t, const char* name, at::ScalarType dtype, const Tensor& tokens) {
  TORCH_CHECK_TYPE(t.defined(), "commit_tokens: ", name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "commit_tokens: ", name, " must be ", dtype, " [B], got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == tokens.size(0), "commit_tokens: ", name, " must be [B] = [",
                    tokens.size(0), "], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cpu() || t.device() == tokens.device(), "commit_tokens: ", name, " is on ", t.device(),
                    " but tokens are on ", tokens.device(), " (it may also be on the CPU)");
}

// The values of a per-sequence parameter on the host (read through its stride), each checked by `ok`; `range`
// names the valid set.
template <class T, class Ok>
void check_host_values(const Tensor& t, const char* name, const char* range, Ok&& ok) {
  if (!t.is_cpu()) return;  // on the device: trusted (see commit_tokens_per_seq)
  const llada::bindings::HostValues<T> v(t);
  for (int64_t b = 0; b < v.size(); ++b)
    TORCH_CHECK_VALUE(ok(v[b]), "commit_tokens: ", name, "[", b, "] = ", v[b], " is outside ", range);
}

PerSequenceTensors checked_per_seq(const Tensor& tokens, const Tensor& threshold, const Tensor& temperature,
                                   const Tensor& top_k, const Tensor& top_p, const Tensor& seed,
                                   const Tensor& offset) {
  check_per_seq(threshold, "threshold", at::kFloat, tokens);
  check_per_seq(temperature, "temperature", at::kFloat, tokens);
  check_per_seq(top_k, "top_k", at::kInt, tokens);
  check_per_seq(top_p, "top_p", at::kFloat, tokens);
  check_per_seq(seed, "seed", at::kLong, tokens);
  check_per_seq(offset, "offset", at::kLong, tokens);
  check_host_values<float>(threshold, "threshold", "[0, 1]", [](float x) { return x >= 0.0f && x <= 1.0f; });
  check_host_values<float>(temperature, "temperature", "[0, inf) (finite)",
                           [](float x) { return std::isfinite(x) && x >= 0.0f; });
  check_host_values<int32_t>(top_k, "top_k", "[0, inf)", [](int32_t x) { return x >= 0; });
  check_host_values<float>(top_p, "top_p", "(0, 1]", [](float x) { return x > 0.0f && x <= 1.0f; });
  // Where the kernel reads them: contiguous, on the tokens' device (host values uploaded without a sync).
  const auto place = [&tokens](const Tensor& t) {
    const Tensor c = t.contiguous();
    if (c.device() == tokens.device()) return c;
    return c.pin_memory().to(tokens.device(), /*non_blocking=*/true);
  };
  return PerSequenceTensors{place(threshold), place(temperature), place(top_k), place(top_p), place(seed),
                            place(offset)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> commit_tokens_per_seq_inplace(
    Tensor tokens, const Tensor& logits, const Tensor& min_commit, const Tensor& threshold,
    const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, const Tensor& seed, const Tensor& offset,
    int64_t mask_id, bool own_streams) {
  llada::bindings::check_defined("commit_tokens", {{"tokens", &tokens}, {"logits", &logits},
                                                   {"min_commit", &min_commit}});
  // The scalars are placeholders (valid values): every kernel reads the per-sequence pointers instead.
  llada::CommitTokensParams p = make_params(tokens, logits, min_commit, mask_id, 0.0, 0.0, 0, 1.0, 0, 0);
  const PerSequenceTensors per = checked_per_seq(tokens, threshold, temperature, top_k, top_p, seed, offset);
  p.per_seq.threshold = per.threshold.data_ptr<float>();
  p.per_seq.temperature = per.temperature.data_ptr<float>();
  p.per_seq.top_k = per.top_k.data_ptr<int32_t>();
  p.per_seq.top_p = per.top_p.data_ptr<float>();
  p.per_seq.seed = per.seed.data_ptr<int64_t>();
  p.per_seq.offset = per.offset.data_ptr<int64_t>();
  p.own_streams = own_streams;
  Tensor committed = at::empty(tokens.sizes(), tokens.options().dtype(at::kBool));
  Tensor confidence = at::empty(tokens.sizes(), tokens.options().dtype(at::kFloat));
  Tensor candidates = at::empty(tokens.sizes(), tokens.options());
  Tensor invalid = at::zeros({tokens.size(0)}, tokens.options().dtype(at::kBool));
  p.committed = committed.data_ptr<bool>();
  p.confidence = confidence.data_ptr<float>();
  p.candidates = candidates.data_ptr<int64_t>();
  p.invalid = invalid.data_ptr<bool>();

  const llada::Status s = run_commit(p, tokens, min_commit);
  TORCH_CHECK(s == llada::Status::kOk, "commit_tokens: ", llada::status_string(s));
  return {committed, confidence, candidates, invalid};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> commit_tokens_per_seq(
    const Tensor& tokens, const Tensor& logits, const Tensor& min_commit, const Tensor& threshold,
    const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, const Tensor& seed, const Tensor& offset,
    int64_t mask_id, bool own_streams) {
  llada::bindings::check_defined("commit_tokens", {{"tokens", &tokens}});
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "commit_tokens: tokens must be int64, got ",
                   tokens.scalar_type());
  Tensor out = tokens.contiguous().clone();
  auto [committed, confidence, candidates, invalid] = commit_tokens_per_seq_inplace(
      out, logits, min_commit, threshold, temperature, top_k, top_p, seed, offset, mask_id, own_streams);
  return {out, committed, confidence, candidates, invalid};
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("commit_tokens", &commit_tokens);
  m.impl("commit_tokens_", &commit_tokens_inplace);
  m.impl("commit_tokens_per_seq", &commit_tokens_per_seq);
  m.impl("commit_tokens_per_seq_", &commit_tokens_per_seq_inplace);
}

#ifdef LLADA_WITH_CUDA
TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("commit_tokens", &commit_tokens);
  m.impl("commit_tokens_", &commit_tokens_inplace);
  m.impl("commit_tokens_per_seq", &commit_tokens_per_seq);
  m.impl("commit_tokens_per_seq_", &commit_tokens_per_seq_inplace);
}
#endif
