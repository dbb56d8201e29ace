// commit_tokens_cpu against a direct double-precision computation: greedy tokens, confidences and
// decisions; sampling reproducible and top_k = 1 equal to greedy; NaN reported (failing, or through the
// invalid flag); per-sequence parameters equal to calls on each sequence alone.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "llada/sampling.h"

namespace {

struct Case {
  int64_t B, L, V, mask_id;
  std::vector<int64_t> tokens;
  std::vector<float> logits;
  std::vector<int32_t> min_commit;
  std::vector<bool> committed_buf;
};

struct Out {
  std::vector<int64_t> tokens, candidates;
  std::vector<float> confidence;
  std::vector<char> committed;
  llada::Status status;
};

Out run(const Case& c, float temperature, int64_t top_k, float top_p, uint64_t seed) {
  Out o;
  o.tokens = c.tokens;
  o.candidates.resize(c.B * c.L);
  o.confidence.resize(c.B * c.L);
  bool* committed = new bool[c.B * c.L];
  llada::CommitTokensParams p;
  p.tokens = o.tokens.data();
  p.logits = c.logits.data();
  p.logits_dtype = llada::DType::kFloat32;
  p.min_commit = c.min_commit.data();
  p.committed = committed;
  p.confidence = o.confidence.data();
  p.candidates = o.candidates.data();
  p.batch = c.B;
  p.block = c.L;
  p.vocab = c.V;
  p.mask_id = c.mask_id;
  p.threshold = 0.5f;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  o.status = llada::commit_tokens_cpu(p);
  o.committed.assign(committed, committed + c.B * c.L);
  delete[] committed;
  return o;
}

Case make_case(int64_t B, int64_t L, int64_t V, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  Case c{B, L, V, V - 1, {}, {}, {}, {}};
  c.tokens.resize(B * L);
  for (auto& t : c.tokens) t = (V > 1 && rng() % 3 == 0) ? static_cast<int64_t>(rng() % (V - 1)) : c.mask_id;
  c.logits.resize(B * L * V);
  for (auto& x : c.logits) x = normal(rng);
  c.min_commit.resize(B);
  for (auto& m : c.min_commit) m = static_cast<int32_t>(rng() % 4);
  return c;
}

}  // namespace

int main() {
  for (int64_t V : {1, 7, 1000, 4099}) {
    const Case c = make_case(3, 9, V, V > 100 ? 6.0f : 2.0f, static_cast<uint32_t>(V));
    const Out o = run(c, 0.0f, 0, 1.0f, 0);
    CHECK(o.status == llada::Status::kOk);
    for (int64_t r = 0; r < c.B * c.L; ++r) {
      const float* row = c.logits.data() + r * V;
      int64_t arg = 0;
      for (int64_t i = 1; i < V; ++i)
        if (row[i] > row[arg]) arg = i;
      double sum = 0.0;
      for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(row[i]) - row[arg]);
      CHECK(o.candidates[r] == arg);
      if (c.tokens[r] == c.mask_id) CHECK_NEAR(o.confidence[r], 1.0 / sum, 1e-6);
      else CHECK(o.confidence[r] == -std::numeric_limits<float>::infinity());
      if (c.tokens[r] != c.mask_id) CHECK(!o.committed[r] && o.tokens[r] == c.tokens[r]);
      if (o.committed[r]) CHECK(o.tokens[r] == arg);
    }
    // top_k = 1 is greedy with confidence 1; sampling is reproducible and stays in the top-k set.
    const Out k1 = run(c, 0.8f, 1, 1.0f, 5);
    for (int64_t r = 0; r < c.B * c.L; ++r) CHECK(k1.candidates[r] == o.candidates[r]);
    const Out s1 = run(c, 1.0f, 3, 1.0f, 42), s2 = run(c, 1.0f, 3, 1.0f, 42);
    CHECK(s1.candidates == s2.candidates && s1.tokens == s2.tokens);
  }

  Case bad = make_case(2, 4, 50, 1.0f, 9);
  const std::vector<int64_t> before = bad.tokens;
  bad.logits[77] = std::numeric_limits<float>::quiet_NaN();
  const Out o = run(bad, 0.0f, 0, 1.0f, 0);
  CHECK(o.status == llada::Status::kNanInput);
  CHECK(o.tokens == before);

  // With the invalid flag the kernel does not fail: the NaN row (position 77 / V = row 1, sequence 0) gets
  // token 0 and confidence NaN (where masked), is never committed, and flags its sequence only.
  {
    Case c = make_case(2, 4, 50, 1.0f, 9);
    c.logits[77] = std::numeric_limits<float>::quiet_NaN();
    c.tokens[1] = c.mask_id;
    std::vector<int64_t> tokens = c.tokens, candidates(8);
    std::vector<float> confidence(8);
    bool committed[8], invalid[2] = {true, true};
    llada::CommitTokensParams p;
    p.tokens = tokens.data();
    p.logits = c.logits.data();
    p.min_commit = c.min_commit.data();
    p.committed = committed;
    p.confidence = confidence.data();
    p.candidates = candidates.data();
    p.batch = 2;
    p.block = 4;
    p.vocab = 50;
    p.mask_id = c.mask_id;
    p.invalid = invalid;
    CHECK(llada::commit_tokens_cpu(p) == llada::Status::kOk);
    CHECK(invalid[0] && !invalid[1]);
    CHECK(std::isnan(confidence[1]) && candidates[1] == 0 && !committed[1] && tokens[1] == c.mask_id);
  }

  // Per-sequence parameters: sequence 1 greedy, sequence 0 sampled; with own streams each equals a call on it
  // alone.
  {
    const Case c = make_case(2, 9, 300, 2.0f, 11);
    const float temperature[2] = {1.0f, 0.0f}, threshold[2] = {0.2f, 0.9f}, top_p[2] = {0.9f, 1.0f};
    const int32_t top_k[2] = {0, 0};
    const int64_t seed[2] = {7, 8}, offset[2] = {3, 0};
    std::vector<int64_t> tokens = c.tokens, candidates(18);
    std::vector<float> confidence(18);
    bool committed[18];
    llada::CommitTokensParams p;
    p.tokens = tokens.data();
    p.logits = c.logits.data();
    p.min_commit = c.min_commit.data();
    p.committed = committed;
    p.confidence = confidence.data();
    p.candidates = candidates.data();
    p.batch = 2;
    p.block = 9;
    p.vocab = 300;
    p.mask_id = c.mask_id;
    p.per_seq = {threshold, temperature, top_k, top_p, seed, offset};
    p.own_streams = true;
    CHECK(llada::commit_tokens_cpu(p) == llada::Status::kOk);
    for (int64_t b = 0; b < 2; ++b) {
      std::vector<int64_t> t1(c.tokens.begin() + b * 9, c.tokens.begin() + (b + 1) * 9), cand1(9);
      std::vector<float> conf1(9);
      bool comm1[9];
      llada::CommitTokensParams q = p;
      q.tokens = t1.data();
      q.logits = c.logits.data() + b * 9 * 300;
      q.min_commit = c.min_commit.data() + b;
      q.committed = comm1;
      q.confidence = conf1.data();
      q.candidates = cand1.data();
      q.batch = 1;
      q.per_seq = {};
      q.threshold = threshold[b];
      q.temperature = temperature[b];
      q.top_k = top_k[b];
      q.top_p = top_p[b];
      q.seed = static_cast<uint64_t>(seed[b]);
      q.offset = static_cast<uint64_t>(offset[b]);
      q.own_streams = false;  // B = 1: row l either way
      CHECK(llada::commit_tokens_cpu(q) == llada::Status::kOk);
      for (int64_t l = 0; l < 9; ++l) {
        CHECK(cand1[l] == candidates[b * 9 + l] && t1[l] == tokens[b * 9 + l] && comm1[l] == committed[b * 9 + l]);
        CHECK(conf1[l] == confidence[b * 9 + l] || (std::isinf(conf1[l]) && std::isinf(confidence[b * 9 + l])));
      }
    }
  }
  TEST_MAIN_END();
}
