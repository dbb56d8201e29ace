// C++ CPU kernel of `commit_tokens` (docs/ARCHITECTURE.md, Token commit): one pass over the vocabulary per
// row for greedy decoding, OpenMP over the B*L rows, then the commit rule per sequence. Each sequence takes
// its own parameters (sampling/sequence_sampling.h), so greedy and sampled sequences mix in one call.
//
// Greedy (temperature 0, no top-k/top-p): an online max / sum-exp / argmax in one read of the row,
// chunked so that the max and the exponentials vectorise. Otherwise: the row is scaled by
// 1/temperature into a scratch buffer, top-k by nth_element, top-p by a descending sort of what
// top-k kept, and x0 drawn by inverse CDF in vocabulary order from the Philox uniform of the row.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "common/fast_exp.h"
#include "common/float_bits.h"
#include "common/host_device.h"
#include "common/philox.h"
#include "llada/sampling.h"
#include "sampling/commit_rule.h"
#include "sampling/sequence_sampling.h"

namespace llada {
namespace {

constexpr int64_t kChunk = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads logits[start, start + n) of a row as fp32.
inline void load_chunk(const void* row, DType dtype, int64_t start, int64_t n, float* out) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(row) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = src[i];
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_to_float(src[i]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_bits_to_float(src[i]);
      break;
    }
  }
}

struct RowProposal {
  int64_t token = 0;
  float confidence = 0.0f;
  bool invalid = false;  // NaN, or no finite maximum
};

// Greedy: x0 = first argmax, confidence = softmax(row)[x0] = 1 / sum exp(row - max).
LLADA_CPU_MULTIVERSION RowProposal propose_greedy(const void* row, DType dtype, int64_t V) {
  alignas(64) float buf[kChunk];
  float m = kNegInf;
  int64_t arg = 0;
  double sum = 0.0;
  bool nan = false;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    load_chunk(row, dtype, start, n, buf);
    float cmax = kNegInf;
    int nan_count = 0;
#pragma omp simd reduction(max : cmax) reduction(+ : nan_count)
    for (int64_t i = 0; i < n; ++i) {
      cmax = std::max(cmax, buf[i]);
      nan_count += buf[i] != buf[i];
    }
    nan |= nan_count != 0;
    if (cmax > m) {
      sum *= std::exp(static_cast<double>(m) - static_cast<double>(cmax));
      m = cmax;
      for (int64_t i = 0; i < n; ++i) {
        if (buf[i] == cmax) {
          arg = start + i;
          break;
        }
      }
    }
    if (m == kNegInf) continue;  // only -inf so far: nothing to add
    float csum = 0.0f;
#pragma omp simd reduction(+ : csum)
    for (int64_t i = 0; i < n; ++i) csum += exp_nonpositive(buf[i] - m);
    sum += csum;
  }
  RowProposal r;
  r.invalid = nan || !std::isfinite(m);
  r.token = arg;
  r.confidence = static_cast<float>(1.0 / sum);
  return r;
}

// Temperature, top-k, top-p, then a draw (or the argmax when temperature is 0).
RowProposal propose_filtered(const void* row, DType dtype, int64_t V, const SequenceSampling& p,
                             uint64_t row_index, std::vector<float>& z, std::vector<float>& scratch) {
  RowProposal r;
  z.resize(V);
  load_chunk(row, dtype, 0, V, z.data());
  if (p.temperature > 0.0f) {
    const float t = p.temperature;
    for (int64_t i = 0; i < V; ++i) z[i] = z[i] / t;
  }
  float m = kNegInf;
  int64_t arg = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (z[i] != z[i]) {
      r.invalid = true;
      return r;
    }
    if (z[i] > m) {
      m = z[i];
      arg = i;
    }
  }
  if (!std::isfinite(m)) {
    r.invalid = true;
    return r;
  }
  float cutoff = kNegInf;  // kept: z >= cutoff
  if (p.top_k > 0 && p.top_k < V) {
    scratch.assign(z.begin(), z.end());
    std::nth_element(scratch.begin(), scratch.begin() + (p.top_k - 1), scratch.end(),
                     std::greater<float>());
    cutoff = scratch[p.top_k - 1];
  }
  if (p.top_p < 1.0f) {
    scratch.clear();
    for (int64_t i = 0; i < V; ++i)
      if (z[i] >= cutoff) scratch.push_back(z[i]);
    std::sort(scratch.begin(), scratch.end(), std::greater<float>());
    double total = 0.0;
    for (float v : scratch) total += std::exp(v - m);
    // Keep a value when the mass strictly above it is <= top_p (whole tie groups together).
    const double budget = static_cast<double>(p.top_p) * total;
    double above = 0.0;
    size_t g = 0;
    while (g < scratch.size() && above <= budget) {
      const float v = scratch[g];
      cutoff = v;
      while (g < scratch.size() && scratch[g] == v) {
        above += std::exp(v - m);
        ++g;
      }
    }
  }
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i)
    if (z[i] >= cutoff) total += std::exp(z[i] - m);
  int64_t token = arg;
  if (p.temperature > 0.0f) {
    const double target = static_cast<double>(commit_uniform(p.seed, p.offset, row_index)) * total;
    double cum = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      if (z[i] < cutoff) continue;
      token = i;
      cum += std::exp(z[i] - m);
      if (cum > target) break;
    }
  }
  r.token = token;
  r.confidence = static_cast<float>(std::exp(static_cast<double>(z[token] - m)) / total);
  return r;
}

size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace

Status commit_tokens_cpu(const CommitTokensParams& p) {
  const int64_t B = p.batch, L = p.block, V = p.vocab;
  const int64_t rows = B * L;
  const char* logits = static_cast<const char*>(p.logits);
  const size_t row_bytes = static_cast<size_t>(V) * dtype_size(p.logits_dtype);
  int invalid_rows = 0;
  if (p.invalid != nullptr) std::fill(p.invalid, p.invalid + B, false);

#pragma omp parallel reduction(+ : invalid_rows)
  {
    std::vector<float> z, scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / (L > 0 ? L : 1);
      const SequenceSampling seq = sequence_sampling(p, b);
      const void* row = logits + static_cast<size_t>(r) * row_bytes;
      RowProposal prop = is_greedy(seq, V)
                             ? propose_greedy(row, p.logits_dtype, V)
                             : propose_filtered(row, p.logits_dtype, V, seq, stream_row(p, b, r - b * L), z, scratch);
      if (prop.invalid) {  // as the CUDA kernels mark it: never eligible
        ++invalid_rows;
        prop.token = 0;
        prop.confidence = std::numeric_limits<float>::quiet_NaN();
        if (p.invalid != nullptr) {
#pragma omp atomic write
          p.invalid[b] = true;
        }
      }
      p.candidates[r] = prop.token;
      const bool masked = p.tokens[r] == p.mask_id;
      p.confidence[r] = masked ? prop.confidence : kNegInf;
    }
  }
  if (invalid_rows > 0 && p.invalid == nullptr) return Status::kNanInput;

#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const float* conf = p.confidence + b * L;
    const float threshold = sequence_sampling(p, b).threshold;
    const CommitCounts counts = commit_counts(conf, L, threshold);
    for (int64_t i = 0; i < L; ++i) {
      const bool commit = commit_decision(conf, L, i, counts, p.min_commit[b], threshold);
      p.committed[b * L + i] = commit;
      if (commit) p.tokens[b * L + i] = p.candidates[b * L + i];
    }
  }
  return Status::kOk;
}

}  // namespace llada
