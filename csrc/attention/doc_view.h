// Where the rows of one document live, as the CUDA attention kernels read them: Rows (one or two
// segments of strided rows, the first possibly paged), and the per-document views of the packed varlen
// layout (PackedDocs) and of the decode form (DecodeDocs: cache rows, contiguous or paged, then the block's
// own). Host/device, tested on the CPU.
#pragma once

#include <cstdint>

#include "attention/block_mask.h"
#include "common/host_device.h"

namespace llada {
namespace attention_cuda {

// Rows of one sequence (and head) in global memory: row j at a + j * a_stride for j < split, else at
// b + (j - split) * b_stride (strides in elements). Packed tensors use the first segment only. With `pages`
// set, the first segment is paged: row j < split is row j % page_rows of page pages[j / page_rows], pages
// page_stride elements apart from a; page ids are clamped to [0, page_count).
template <class T>
struct Rows {
  const T* a;
  int64_t a_stride;
  int64_t split;
  const T* b;
  int64_t b_stride;
  const int32_t* pages = nullptr;
  int64_t page_rows = 1, page_stride = 0, page_count = 0;

  LLADA_HD const T* row(int64_t j) const {
    if (j >= split) return b + (j - split) * b_stride;
    if (pages == nullptr) return a + j * a_stride;
    const int64_t page = max_i64(0, min_i64(pages[j / page_rows], page_count - 1));
    return a + page * page_stride + (j % page_rows) * a_stride;
  }
  LLADA_HD bool aligned16(int vec) const {
    const bool a_ok = a_stride % vec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                      (pages == nullptr || page_stride % vec == 0);
    const bool b_ok = b == nullptr || (b_stride % vec == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0);
    return a_ok && b_ok;
  }
};

template <class T>
LLADA_HD Rows<T> packed_rows(const T* base, int64_t stride) {
  return Rows<T>{base, stride, INT64_MAX, nullptr, 0};
}

// One document as the kernel sees it: its first query row in q / out / lse, its mask, its key and value rows.
template <class T>
struct Doc {
  int64_t q_begin;
  DocMask mask;
  Rows<T> k, v;
};

// The packed varlen layout of block_attention: documents delimited by cu_seqlens.
struct PackedDocs {
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const void* k;
  const void* v;
  int64_t k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  AttentionMask mask;
  int64_t block_size;

  template <class T>
  LLADA_HD Doc<T> get(int64_t seq, int64_t hk) const {
    const int64_t cq = cu_seqlens_q[seq], ck = cu_seqlens_k[seq];
    const DocMask dm{mask, block_size, cu_seqlens_q[seq + 1] - cq, cu_seqlens_k[seq + 1] - ck};
    const T* kb = static_cast<const T*>(k) + ck * k_row_stride + hk * k_head_stride;
    const T* vb = static_cast<const T*>(v) + ck * v_row_stride + hk * v_head_stride;
    return Doc<T>{cq, dm, packed_rows(kb, k_row_stride), packed_rows(vb, v_row_stride)};
  }
};

// The decode form: sequence b's queries are rows b * Lb .. of q; its keys are cache rows [0, len_b) then
// its Lb new rows, all visible (block_causal with one block as long as the keys). The cache is contiguous
// per sequence, or paged when block_table is set: row r of sequence b in row r % page_size of page
// block_table[b * max_pages + r / page_size] of the pools. len_b is clamped to [0, capacity].
struct DecodeDocs {
  const int32_t* cache_seqlens;  // [B] (device memory in the kernels)
  const void* k_cache;           // [B, Smax, Hkv, D] contiguous, or the pool [num_pages, page_size, Hkv, D]
  const void* v_cache;
  const void* k_new;             // [B, Lb, Hkv, D] contiguous
  const void* v_new;
  int64_t block, capacity, heads_kv, head_dim;  // Lb, Smax (paged: max_pages * page_size), Hkv, D
  const int32_t* block_table = nullptr;         // [B, max_pages] (device memory in the kernels), or nullptr
  int64_t max_pages = 0, page_size = 1, num_pages = 0;

  template <class T>
  LLADA_HD Doc<T> get(int64_t seq, int64_t hk) const {
    const int64_t cached = max_i64(0, min_i64(cache_seqlens[seq], capacity)), len_k = cached + block;
    const DocMask dm{AttentionMask::kBlockCausal, len_k, block, len_k};
    const int64_t stride = heads_kv * head_dim;
    const int64_t new_off = seq * block * stride + hk * head_dim;
    const bool paged = block_table != nullptr;
    const int64_t cache_off = (paged ? 0 : seq * capacity * stride) + hk * head_dim;
    const int32_t* pages = paged ? block_table + seq * max_pages : nullptr;
    const Rows<T> kr{static_cast<const T*>(k_cache) + cache_off, stride, cached,
                     static_cast<const T*>(k_new) + new_off, stride, pages, page_size, page_size * stride, num_pages};
    const Rows<T> vr{static_cast<const T*>(v_cache) + cache_off, stride, cached,
                     static_cast<const T*>(v_new) + new_off, stride, pages, page_size, page_size * stride, num_pages};
    return Doc<T>{seq * block, dm, kr, vr};
  }
};

}  // namespace attention_cuda
}  // namespace llada
