// The CUDA attention kernels' views of a document, read on the CPU: PackedDocs finds every packed key
// row of a sequence and head (strided rows, as sliced from a fused projection); DecodeDocs finds the
// cache rows [0, cache_seqlens[b]) and then the block's own rows, with one unmasked block over them, in a
// contiguous cache or through a block table into page pools (shuffled pages, pages nobody owns, unused
// table entries of -1, page sizes 8 to 64), and clamps lengths and page ids it was not meant to get.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "attention/doc_view.h"
#include "check.h"

using llada::attention_cuda::DecodeDocs;
using llada::attention_cuda::Doc;
using llada::attention_cuda::PackedDocs;

namespace {

float value(int64_t tag, int64_t a, int64_t b, int64_t c) { return static_cast<float>(tag * 1000000 + a * 10000 + b * 100 + c); }

void test_decode_docs() {
  const int64_t B = 3, Smax = 7, Lb = 4, Hkv = 2, D = 5;
  const int32_t lens[B] = {0, 5, 7};
  std::vector<float> k_cache(B * Smax * Hkv * D), v_cache(k_cache.size()), k_new(B * Lb * Hkv * D), v_new(k_new.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t s = 0; s < Smax; ++s) {
          k_cache[((b * Smax + s) * Hkv + h) * D + d] = value(1, b, s, h * 10 + d);
          v_cache[((b * Smax + s) * Hkv + h) * D + d] = value(2, b, s, h * 10 + d);
        }
        for (int64_t s = 0; s < Lb; ++s) {
          k_new[((b * Lb + s) * Hkv + h) * D + d] = value(3, b, s, h * 10 + d);
          v_new[((b * Lb + s) * Hkv + h) * D + d] = value(4, b, s, h * 10 + d);
        }
      }
  const DecodeDocs docs{lens, k_cache.data(), v_cache.data(), k_new.data(), v_new.data(), Lb, Smax, Hkv, D};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      const Doc<float> doc = docs.get<float>(b, h);
      CHECK(doc.q_begin == b * Lb);
      CHECK(doc.mask.kind == llada::AttentionMask::kBlockCausal);
      CHECK(doc.mask.len_q == Lb && doc.mask.len_k == lens[b] + Lb && doc.mask.block_size >= doc.mask.len_k);
      for (int64_t j = 0; j < lens[b] + Lb; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const bool cached = j < lens[b];
          const int64_t s = cached ? j : j - lens[b];
          CHECK(doc.k.row(j)[d] == value(cached ? 1 : 3, b, s, h * 10 + d));
          CHECK(doc.v.row(j)[d] == value(cached ? 2 : 4, b, s, h * 10 + d));
        }
      for (int64_t i = 0; i < Lb; ++i)  // every query sees every key: one block, bottom-right aligned
        for (int64_t j = 0; j < lens[b] + Lb; ++j) CHECK(llada::mask_keep(doc.mask, i, j));
    }
  }
}

void test_packed_docs() {
  // k and v interleaved in one [T, 2 * Hkv, D] buffer (row stride 2 * Hkv * D), two documents.
  const int64_t T = 9, Hkv = 2, D = 3;
  const int32_t cu_q[3] = {0, 2, 6}, cu_k[3] = {0, 4, 9};
  std::vector<float> kv(T * 2 * Hkv * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < 2 * Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) kv[(t * 2 * Hkv + h) * D + d] = value(5, t, h, d);
  const PackedDocs docs{cu_q, cu_k, kv.data(), kv.data() + Hkv * D, 2 * Hkv * D, D, 2 * Hkv * D, D,
                        llada::AttentionMask::kBd3, 2};
  for (int64_t s = 0; s < 2; ++s)
    for (int64_t h = 0; h < Hkv; ++h) {
      const Doc<float> doc = docs.get<float>(s, h);
      CHECK(doc.q_begin == cu_q[s]);
      CHECK(doc.mask.kind == llada::AttentionMask::kBd3 && doc.mask.block_size == 2);
      CHECK(doc.mask.len_q == cu_q[s + 1] - cu_q[s] && doc.mask.len_k == cu_k[s + 1] - cu_k[s]);
      for (int64_t j = 0; j < doc.mask.len_k; ++j)
        for (int64_t d = 0; d < D; ++d) {
          CHECK(doc.k.row(j)[d] == value(5, cu_k[s] + j, h, d));
          CHECK(doc.v.row(j)[d] == value(5, cu_k[s] + j, Hkv + h, d));
        }
      CHECK(!doc.k.aligned16(4) || (2 * Hkv * D) % 4 == 0);
    }
}


// Paged: each sequence's rows live in its own pages of a shared pool, in shuffled order; the view of every
// sequence equals the contiguous view of the same logical rows.
void test_paged_decode_docs() {
  std::mt19937 rng(7);
  for (const int64_t page : {8, 16, 32, 64}) {
    const int64_t B = 4, Lb = 3, Hkv = 2, D = 4, max_pages = 5;
    const int32_t lens[B] = {0, static_cast<int32_t>(page), static_cast<int32_t>(2 * page + 5),
                             static_cast<int32_t>(max_pages * page)};
    int64_t used = 0;
    for (int64_t b = 0; b < B; ++b) used += (lens[b] + page - 1) / page;
    const int64_t num_pages = used + 3;  // 3 pages nobody owns
    std::vector<int32_t> ids(num_pages);
    for (int64_t i = 0; i < num_pages; ++i) ids[i] = static_cast<int32_t>(i);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> table(B * max_pages, -1);
    int64_t next = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < (lens[b] + page - 1) / page; ++i) table[b * max_pages + i] = ids[next++];
    std::vector<float> k_pool(num_pages * page * Hkv * D, -1.0f), v_pool(k_pool.size(), -1.0f);
    std::vector<float> k_new(B * Lb * Hkv * D), v_new(k_new.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t s = 0; s < lens[b]; ++s) {
            const int64_t at = ((table[b * max_pages + s / page] * page + s % page) * Hkv + h) * D + d;
            k_pool[at] = value(1, b, s, h * 10 + d);
            v_pool[at] = value(2, b, s, h * 10 + d);
          }
          for (int64_t s = 0; s < Lb; ++s) {
            k_new[((b * Lb + s) * Hkv + h) * D + d] = value(3, b, s, h * 10 + d);
            v_new[((b * Lb + s) * Hkv + h) * D + d] = value(4, b, s, h * 10 + d);
          }
        }
    const DecodeDocs docs{lens, k_pool.data(), v_pool.data(), k_new.data(), v_new.data(), Lb, max_pages * page,
                          Hkv, D, table.data(), max_pages, page, num_pages};
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h) {
        const Doc<float> doc = docs.get<float>(b, h);
        CHECK(doc.q_begin == b * Lb);
        CHECK(doc.mask.len_q == Lb && doc.mask.len_k == lens[b] + Lb);
        CHECK(doc.k.aligned16(4) == (reinterpret_cast<uintptr_t>(k_pool.data() + h * D) % 16 == 0));
        for (int64_t j = 0; j < lens[b] + Lb; ++j)
          for (int64_t d = 0; d < D; ++d) {
            const bool cached = j < lens[b];
            const int64_t s = cached ? j : j - lens[b];
            CHECK(doc.k.row(j)[d] == value(cached ? 1 : 3, b, s, h * 10 + d));
            CHECK(doc.v.row(j)[d] == value(cached ? 2 : 4, b, s, h * 10 + d));
          }
      }
  }
}

// Values that validation on the host would reject, as a device-resident table or lengths could hold them:
// lengths are clamped to [0, capacity], page ids to [0, num_pages), so no row outside the pool is addressed.
void test_paged_decode_docs_clamp() {
  const int64_t page = 8, Hkv = 1, D = 2, max_pages = 2, num_pages = 3, Lb = 1;
  const int32_t lens[3] = {-5, 1000, 9};
  const int32_t table[3 * max_pages] = {0, 1, 2, 2, -7, 99};
  std::vector<float> k_pool(num_pages * page * Hkv * D), k_new(3 * Lb * Hkv * D);
  const DecodeDocs docs{lens, k_pool.data(), k_pool.data(), k_new.data(), k_new.data(), Lb, max_pages * page,
                        Hkv, D, table, max_pages, page, num_pages};
  const float* first = k_pool.data();
  const float* last = k_pool.data() + k_pool.size();
  CHECK(docs.get<float>(0, 0).mask.len_k == Lb);
  CHECK(docs.get<float>(1, 0).mask.len_k == max_pages * page + Lb);
  for (int64_t b = 0; b < 3; ++b) {
    const Doc<float> doc = docs.get<float>(b, 0);
    for (int64_t j = 0; j + Lb < doc.mask.len_k; ++j) CHECK(doc.k.row(j) >= first && doc.k.row(j) + D <= last);
  }
  CHECK(docs.get<float>(2, 0).k.row(0) == first);              // page -7 -> 0
  CHECK(docs.get<float>(2, 0).k.row(8) == first + 2 * page * D);  // page 99 -> 2
}

}  // namespace

int main() {
  test_decode_docs();
  test_paged_decode_docs();
  test_paged_decode_docs_clamp();
  test_packed_docs();
  TEST_MAIN_END();
}
