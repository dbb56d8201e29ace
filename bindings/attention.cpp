// Bindings of the block-attention family (csrc/attention): validate the tensors (shapes, dtypes,
// devices, cu_seqlens, mask arguments), fill llada::BlockAttention*Params and call the CPU or CUDA kernels
// (every op has both). cu_seqlens and cache_seqlens on a GPU are copied to the host once to be validated;
// cache_seqlens may also come from the CPU, which spares the decode form that device synchronisation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "llada/attention.h"
#include "validation.h"

#ifdef LLADA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

llada::DType attention_dtype(const Tensor& t, const char* op, const char* name) {
  if (t.is_cuda()) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", name,
                     " must be bfloat16 or float16 on CUDA, got ", t.scalar_type());
    return t.scalar_type() == at::kBFloat16 ? llada::DType::kBFloat16 : llada::DType::kFloat16;
  }
  switch (t.scalar_type()) {
    case at::kFloat: return llada::DType::kFloat32;
    case at::kBFloat16: return llada::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32 or bfloat16 on the CPU, got ", t.scalar_type());
  }
}

llada::AttentionMask parse_mask(const std::string& mask) {
  if (mask == "block_causal") return llada::AttentionMask::kBlockCausal;
  if (mask == "bd3") return llada::AttentionMask::kBd3;
  TORCH_CHECK_VALUE(false, "block_attention: mask must be \"block_causal\" or \"bd3\", got \"", mask, "\"");
}

// The last dimension contiguous; rows and heads may be strided (e.g. q, k, v sliced from a fused qkv).
Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

using llada::bindings::check_same_device;

// Checks one cu_seqlens: int32 [S + 1], 0 first, non-decreasing, `total` last; returns the longest length.
// `host` is cu on the CPU. The entry points pass cu_seqlens made contiguous, as the kernels read them.
int64_t check_cu_seqlens(const Tensor& cu, const Tensor& host, const char* name, int64_t S, int64_t total) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "block_attention: ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) == S + 1, "block_attention: ", name, " must be [S + 1] = [", S + 1,
                    "] like cu_seqlens_q, got shape ", cu.sizes());
  const llada::bindings::HostValues<int32_t> c(host);
  TORCH_CHECK_VALUE(c[0] == 0, "block_attention: ", name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(c[s + 1] >= c[s], "block_attention: ", name, " must be non-decreasing, but ", name, "[", s + 1,
                      "] = ", c[s + 1], " < ", name, "[", s, "] = ", c[s]);
    longest = std::max<int64_t>(longest, c[s + 1] - c[s]);
  }
  TORCH_CHECK_VALUE(c[S] == total, "block_attention: ", name, " must end at the tensor length ", total, ", got ", c[S]);
  return longest;
}

llada::BlockAttentionParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                                        const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                        int64_t block_size, const std::string& mask, double softmax_scale) {
  const char* op = "block_attention";
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [Tq, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must be [Tk, Hkv, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_same_device(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q},
                         {"cu_seqlens_k", &cu_seqlens_k}});
  const llada::DType dtype = attention_dtype(q, op, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": k and v must have the dtype of q (", q.scalar_type(), "), got ", k.scalar_type(), " and ",
                   v.scalar_type());
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(2) == D, op, ": k must have the head dim of q (", D, "), got ", k.size(2));
  TORCH_CHECK_VALUE(D >= 1 && Hkv >= 1, op, ": k must have at least one head and D >= 1, got shape ", k.sizes());
  TORCH_CHECK_VALUE(Hq % Hkv == 0, op, ": the heads of q (", Hq, ") must be a multiple of the heads of k (", Hkv, ")");
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  llada::bindings::check_float32_normal(op, "softmax_scale", softmax_scale);
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op,
                    ": cu_seqlens_q must be [S + 1] with S >= 0, got shape ", cu_seqlens_q.sizes());
  TORCH_CHECK_VALUE(!q.is_cuda() || D == 64 || D == 128, op, ": the head dim of q must be 64 or 128 on CUDA, got ", D);
  const int64_t S = cu_seqlens_q.size(0) - 1;
  const Tensor cu_q_host = cu_seqlens_q.cpu(), cu_k_host = cu_seqlens_k.cpu();
  const int64_t longest_q = check_cu_seqlens(cu_seqlens_q, cu_q_host, "cu_seqlens_q", S, q.size(0));
  const int64_t longest_k = check_cu_seqlens(cu_seqlens_k, cu_k_host, "cu_seqlens_k", S, k.size(0));
  TORCH_CHECK_VALUE(max_seqlen_q >= longest_q, op, ": max_seqlen_q (", max_seqlen_q,
                    ") is below the longest query sequence (", longest_q, ")");
  TORCH_CHECK_VALUE(max_seqlen_k >= longest_k, op, ": max_seqlen_k (", max_seqlen_k,
                    ") is below the longest key sequence (", longest_k, ")");
  llada::bindings::check_int32_range(op, "max_seqlen_q", max_seqlen_q);
  llada::bindings::check_int32_range(op, "max_seqlen_k", max_seqlen_k);
  const llada::AttentionMask kind = parse_mask(mask);
  if (kind == llada::AttentionMask::kBd3) {
    const llada::bindings::HostValues<int32_t> cq(cu_q_host), ck(cu_k_host);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t lq = cq[s + 1] - cq[s], lk = ck[s + 1] - ck[s];
      TORCH_CHECK_VALUE(lq == lk && lq % 2 == 0, op, ": mask \"bd3\" needs [x_t | x_0] sequences of even length "
                        "with equal query and key lengths (cu_seqlens_q, cu_seqlens_k), but sequence ", s,
                        " has ", lq, " queries and ", lk, " keys");
    }
  }

  llada::BlockAttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = dtype;
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.num_seqs = S;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.mask = kind;
  p.block_size = block_size;
  p.softmax_scale = static_cast<float>(softmax_scale);
  return p;
}

void check_status(llada::Status s, const char* op) {
  TORCH_CHECK(s == llada::Status::kOk, op, ": ", llada::status_string(s));
}

llada::AttentionKernel parse_kernel(const std::string& kernel, const Tensor& q) {
  const char* op = "block_attention";
  TORCH_CHECK_VALUE(kernel == "auto" || kernel == "flash2" || kernel == "hopper", op,
                    ": kernel must be \"auto\", \"flash2\" or \"hopper\", got \"", kernel, "\"");
  TORCH_CHECK_VALUE(kernel == "auto" || q.is_cuda(), op, ": kernel \"", kernel,
                    "\" names a CUDA kernel, but q is on the CPU (use \"auto\")");
  // "auto" takes flash2 until the Hopper kernels have passed the GPU tests on a card (README, ops table).
  return kernel == "hopper" ? llada::AttentionKernel::kHopper : llada::AttentionKernel::kFlash2;
}

// The errors of an explicitly requested Hopper kernel, then any other.
void check_kernel_status(llada::Status s, llada::AttentionKernel which, const char* op, const Tensor& q,
                         const Tensor& k, const Tensor& v) {
  const bool hopper = which == llada::AttentionKernel::kHopper;
  TORCH_CHECK(!(hopper && s == llada::Status::kNotCompiled), op,
              ": kernel \"hopper\" needs an sm_90 GPU and a build with sm_90a code");
  TORCH_CHECK_VALUE(!(hopper && s == llada::Status::kBadArgument), op,
                    ": kernel \"hopper\" needs q, k and v with 16-byte aligned rows, heads and data pointers "
                    "(strides of q ", q.strides(), ", k ", k.strides(), ", v ", v.strides(), ")");
  check_status(s, op);
}

std::tuple<Tensor, Tensor> block_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                               const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t block_size,
                                               const std::string& mask, double softmax_scale,
                                               const std::string& kernel) {
  llada::bindings::check_defined("block_attention", {{"q", &q_in}, {"k", &k_in}, {"v", &v_in},
                                                     {"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k}});
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const llada::AttentionKernel which = parse_kernel(kernel, q);
  llada::BlockAttentionParams p =
      make_params(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, block_size, mask, softmax_scale);
  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (q.is_cpu()) {
    check_status(llada::block_attention_fwd_cpu(p), "block_attention");
  } else {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const llada::Status s = llada::block_attention_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream(), which);
    check_kernel_status(s, which, "block_attention", q, k, v);
#else
    TORCH_CHECK(false, "block_attention: llada_engine was built without CUDA kernels");
#endif
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> block_attention_bwd(
    const Tensor& dout, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out,
    const Tensor& lse, const std::optional<Tensor>& dlse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t block_size, const std::string& mask, double softmax_scale,
    const std::string& kernel) {
  const char* op = "block_attention_bwd";
  llada::bindings::check_defined(op, {{"dout", &dout}, {"q", &q_in}, {"k", &k_in}, {"v", &v_in}, {"out", &out},
                                      {"lse", &lse}, {"cu_seqlens_q", &cu_seqlens_q},
                                      {"cu_seqlens_k", &cu_seqlens_k}});
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const llada::AttentionKernel which = parse_kernel(kernel, q);
  llada::BlockAttentionBwdParams p;
  p.fwd = make_params(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, block_size, mask, softmax_scale);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": dout and out must have the shape of q ", q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": dout and out must have the dtype of q (", q.scalar_type(), "), got ", dout.scalar_type(), " and ",
                   out.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1), op,
                    ": lse must be [Tq, Hq] = [", q.size(0), ", ", q.size(1), "], got shape ", lse.sizes());
  check_same_device(op, {{"q", &q}, {"dout", &dout}, {"out", &out}, {"lse", &lse}});
  const Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK_TYPE(dlse->scalar_type() == at::kFloat, op, ": dlse must be float32, got ", dlse->scalar_type());
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), op, ": dlse must have the shape of lse ", lse.sizes(), ", got ",
                      dlse->sizes());
    check_same_device(op, {{"q", &q}, {"dlse", &*dlse}});
    dlse_c = dlse->contiguous();
    p.dlse = dlse_c.data_ptr<float>();
  }
  p.fwd.out = const_cast<void*>(out_c.data_ptr());
  p.fwd.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = dout_c.data_ptr();
  Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (q.is_cpu()) {
    check_status(llada::block_attention_bwd_cpu(p), op);
  } else {
#ifdef LLADA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const Tensor workspace =
        at::empty({llada::block_attention_bwd_cuda_workspace_bytes(p)}, q.options().dtype(at::kByte));
    const llada::Status s = llada::block_attention_bwd_cuda(
        p, workspace.numel() > 0 ? workspace.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream(), which);
    check_kernel_status(s, which, op, q, k, v);
#else
    TORCH_CHECK(false, op, ": llada_engine was built without CUDA kernels");
#endif
  }
  return {dq, dk, dv};
}

// Checks the arguments of the decode form (everything but the values of cache_seqlens, which may be on a GPU).
// `paged`: k_cache and v_cache are page pools [num_pages, page_size, Hkv, D] (check_block_table checks the rest).
void check_decode_args(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                       const Tensor& k_new, const Tensor& v_new, double softmax_scale, bool paged = false) {
  const char* op = "block_attention_decode";
  llada::bindings::check_defined(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
                                      {"cache_seqlens", &cache_seqlens}, {"k_new", &k_new}, {"v_new", &v_new}});
  const char* cache_shape = paged ? "[num_pages, page_size, Hkv, D]" : "[B, Smax, Hkv, D]";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Lb, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op, ": k_cache must be ", cache_shape, ", got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t B = q.size(0), Lb = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(paged || k_cache.size(0) == B, op, ": k_cache must be [B, Smax, Hkv, D] with B = ", B,
                    " as in q, got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(3) == D, op, ": k_cache must be ", cache_shape, " with D = ", D,
                    " as in q, got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(k_new.dim() == 4 && k_new.size(0) == B && k_new.size(1) == Lb && k_new.size(2) == Hkv &&
                        k_new.size(3) == D,
                    op, ": k_new must be [B, Lb, Hkv, D] = [", B, ", ", Lb, ", ", Hkv, ", ", D, "], got shape ",
                    k_new.sizes());
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), op, ": v_new must have the shape of k_new ", k_new.sizes(),
                    ", got ", v_new.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && D >= 1 && Hq % Hkv == 0, op, ": the heads of q (", Hq,
                    ") must be a multiple of the heads of k_cache (", Hkv, ")");
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, op, ": cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, op, ": cache_seqlens must be [B] = [", B,
                    "], got shape ", cache_seqlens.sizes());
  check_same_device(op,
                    {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k_new", &k_new}, {"v_new", &v_new}});
  TORCH_CHECK_VALUE(cache_seqlens.is_cpu() || cache_seqlens.device() == q.device(), op, ": cache_seqlens is on ",
                    cache_seqlens.device(), " but q is on ", q.device(), " (it may also be on the CPU)");
  attention_dtype(q, op, "q");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"k_cache", &k_cache}, {"v_cache", &v_cache},
                                {"k_new", &k_new}, {"v_new", &v_new}})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (",
                     q.scalar_type(), "), got ", t->scalar_type());
  TORCH_CHECK_VALUE(!q.is_cuda() || D == 64 || D == 128, op, ": the head dim of q must be 64 or 128 on CUDA, got ", D);
  llada::bindings::check_float32_normal(op, "softmax_scale", softmax_scale);
}

// cache_seqlens on the host as the kernel reads them (contiguous), each checked to lie in [0, Smax].
Tensor checked_cache_seqlens(const Tensor& cache_seqlens, int64_t Smax) {
  const Tensor lens = cache_seqlens.cpu().contiguous();
  const llada::bindings::HostValues<int32_t> l(lens);
  for (int64_t b = 0; b < l.size(); ++b)
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= Smax, "block_attention_decode: cache_seqlens[", b, "] = ", l[b],
                      " is outside [0, Smax = ", Smax, "]");
  return lens;
}

// The paged form's block table: int32 [B, max_pages] on the CPU or q's device, pages of a multiple of 8 rows.
void check_block_table(const Tensor& q, const Tensor& k_cache, const Tensor& block_table) {
  const char* op = "block_attention_decode";
  llada::bindings::check_defined(op, {{"block_table", &block_table}});
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt, op, ": block_table must be int32, got ",
                   block_table.scalar_type());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == q.size(0), op,
                    ": block_table must be [B, max_pages] with B = ", q.size(0), " as in q, got shape ",
                    block_table.sizes());
  TORCH_CHECK_VALUE(block_table.is_cpu() || block_table.device() == q.device(), op, ": block_table is on ",
                    block_table.device(), " but q is on ", q.device(), " (it may also be on the CPU)");
  const int64_t page_size = k_cache.size(1);
  TORCH_CHECK_VALUE(page_size >= 8 && page_size % 8 == 0, op,
                    ": the page size (k_cache.size(1)) must be a positive multiple of 8, got ", page_size);
  TORCH_CHECK_VALUE(block_table.size(1) * page_size <= INT32_MAX, op, ": block_table holds ", block_table.size(1),
                    " pages of ", page_size, " rows, more rows than int32 cache_seqlens can count");
}

// cache_seqlens of the paged form on the host as the kernel reads them (contiguous), each checked to lie in
// [0, max_pages * page_size].
Tensor checked_paged_seqlens(const Tensor& cache_seqlens, int64_t max_pages, int64_t page_size) {
  const Tensor lens = cache_seqlens.cpu().contiguous();
  const llada::bindings::HostValues<int32_t> l(lens);
  for (int64_t b = 0; b < l.size(); ++b)
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= max_pages * page_size, "block_attention_decode: cache_seqlens[", b,
                      "] = ", l[b], " is outside [0, max_pages * page_size = ", max_pages * page_size, "]");
  return lens;
}

// The pages each sequence reads (block_table[b, :ceil(cache_seqlens[b] / page_size)], on the host, as the kernel
// reads them) are pages of the pool; the table's other entries may hold anything.
void check_block_table_pages(const Tensor& host_table, const Tensor& host_lens, int64_t page_size, int64_t num_pages) {
  const llada::bindings::HostValues<int32_t> l(host_lens);
  for (int64_t b = 0; b < host_table.size(0); ++b) {
    const llada::bindings::HostValues<int32_t> pages(host_table[b]);
    for (int64_t i = 0; i * page_size < l[b]; ++i)
      TORCH_CHECK_VALUE(pages[i] >= 0 && pages[i] < num_pages, "block_attention_decode: block_table[", b, ", ", i,
                        "] = ", pages[i], " is not a page of k_cache (num_pages = ", num_pages, "), but sequence ", b,
                        " reads it (cache_seqlens[", b, "] = ", l[b], ")");
  }
}

// The index tensors of one decode call as the kernel reads them, and the bound of cache_seqlens known on the host.
struct DecodeIndex {
  Tensor lens;   // cache_seqlens
  Tensor table;  // block_table, or undefined for the contiguous cache
  int64_t max_cache_seqlen;
};

// Validates what is on the host: cache_seqlens (and with it the pages each sequence reads, when block_table is on
// the host too). Values on a GPU are not read (no device synchronisation): the kernel clamps them instead.
DecodeIndex paged_index(const Tensor& q, const Tensor& k_cache, const Tensor& cache_seqlens, const Tensor& block_table) {
  const int64_t max_pages = block_table.size(1), page_size = k_cache.size(1), capacity = max_pages * page_size;
  DecodeIndex index{cache_seqlens, block_table.contiguous(), capacity};
  if (cache_seqlens.is_cpu()) {
    index.lens = checked_paged_seqlens(cache_seqlens, max_pages, page_size);
    const llada::bindings::HostValues<int32_t> l(index.lens);
    index.max_cache_seqlen = 0;
    for (int64_t b = 0; b < l.size(); ++b) index.max_cache_seqlen = std::max<int64_t>(index.max_cache_seqlen, l[b]);
    if (block_table.is_cpu()) check_block_table_pages(index.table, index.lens, page_size, k_cache.size(0));
  }
  return index;
}

// Runs the decode form on contiguous copies of the inputs; `index` holds cache_seqlens (and block_table) where
// the kernel reads them (host memory for the CPU kernel, the device for CUDA).
template <class Kernel>
std::tuple<Tensor, Tensor> run_decode(const Tensor& q_in, const Tensor& k_cache_in, const Tensor& v_cache_in,
                                      const DecodeIndex& index, const Tensor& k_new_in, const Tensor& v_new_in,
                                      double softmax_scale, Kernel&& kernel) {
  const Tensor q = q_in.contiguous(), k_cache = k_cache_in.contiguous(), v_cache = v_cache_in.contiguous();
  const Tensor k_new = k_new_in.contiguous(), v_new = v_new_in.contiguous(), lens_c = index.lens.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  llada::BlockAttentionDecodeParams p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = lens_c.data_ptr<int32_t>();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.dtype = attention_dtype(q, "block_attention_decode", "q");
  p.batch = q.size(0);
  p.block = q.size(1);
  p.cache_capacity = k_cache.size(1);
  p.max_cache_seqlen = index.max_cache_seqlen;
  p.heads_q = q.size(2);
  p.heads_kv = k_cache.size(2);
  p.head_dim = q.size(3);
  p.softmax_scale = static_cast<float>(softmax_scale);
  if (index.table.defined()) {
    p.block_table = index.table.data_ptr<int32_t>();
    p.max_pages = index.table.size(1);
    p.page_size = k_cache.size(1);
    p.num_pages = k_cache.size(0);
    p.cache_capacity = p.max_pages * p.page_size;
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_status(kernel(p), "block_attention_decode");
  return {out, lse};
}

// The index tensors on the host, validated: cache_seqlens, and block_table with the pages each sequence reads.
DecodeIndex host_index(const Tensor& q, const Tensor& k_cache, const Tensor& cache_seqlens,
                       const std::optional<Tensor>& block_table) {
  if (!block_table.has_value()) {
    const Tensor lens = checked_cache_seqlens(cache_seqlens, k_cache.size(1));
    const llada::bindings::HostValues<int32_t> l(lens);
    int64_t longest = 0;
    for (int64_t b = 0; b < l.size(); ++b) longest = std::max<int64_t>(longest, l[b]);
    return DecodeIndex{lens, Tensor(), longest};
  }
  return paged_index(q, k_cache, cache_seqlens, *block_table);
}

void check_decode_call(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                       const Tensor& k_new, const Tensor& v_new, double softmax_scale,
                       const std::optional<Tensor>& block_table) {
  check_decode_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, block_table.has_value());
  if (block_table.has_value()) check_block_table(q, k_cache, *block_table);
}

std::tuple<Tensor, Tensor> block_attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                  const Tensor& cache_seqlens, const Tensor& k_new,
                                                  const Tensor& v_new, double softmax_scale,
                                                  const std::optional<Tensor>& block_table) {
  check_decode_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, block_table);
  return run_decode(q, k_cache, v_cache, host_index(q, k_cache, cache_seqlens, block_table), k_new, v_new,
                    softmax_scale,
                    [](const llada::BlockAttentionDecodeParams& p) { return llada::block_attention_decode_cpu(p); });
}

#ifdef LLADA_WITH_CUDA
// A host tensor on q's device without waiting for the device (pinned memory, asynchronous copy).
Tensor upload(const Tensor& host, const Tensor& q) { return host.pin_memory().to(q.device(), /*non_blocking=*/true); }

std::tuple<Tensor, Tensor> block_attention_decode_cuda(const Tensor& q, const Tensor& k_cache,
                                                       const Tensor& v_cache, const Tensor& cache_seqlens,
                                                       const Tensor& k_new, const Tensor& v_new,
                                                       double softmax_scale,
                                                       const std::optional<Tensor>& block_table) {
  check_decode_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, block_table);
  // The contiguous form copies cache_seqlens from a GPU to validate it (one synchronisation); the paged form
  // validates only what is on the host and trusts device values (the kernel clamps them into the cache).
  DecodeIndex index = host_index(q, k_cache, cache_seqlens, block_table);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  index.lens = cache_seqlens.is_cuda() ? cache_seqlens : upload(index.lens, q);
  if (index.table.defined() && index.table.is_cpu()) index.table = upload(index.table, q);
  return run_decode(q, k_cache, v_cache, index, k_new, v_new, softmax_scale,
                    [stream, &q](const llada::BlockAttentionDecodeParams& p) {
                      const Tensor workspace = at::empty({llada::block_attention_decode_cuda_workspace_bytes(p)},
                                                         q.options().dtype(at::kByte));
                      return llada::block_attention_decode_cuda(
                          p, workspace.numel() > 0 ? workspace.data_ptr() : nullptr, stream);
                    });
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("block_attention_fwd", &block_attention_fwd);
  m.impl("block_attention_bwd", &block_attention_bwd);
  m.impl("block_attention_decode", &block_attention_decode);
}

#ifdef LLADA_WITH_CUDA
TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("block_attention_fwd", &block_attention_fwd);
  m.impl("block_attention_bwd", &block_attention_bwd);
  m.impl("block_attention_decode", &block_attention_decode_cuda);
}
#endif
