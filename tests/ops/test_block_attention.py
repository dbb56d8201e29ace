"""block_attention against its dense-mask reference on every device: both masks, packed documents of
lengths 1, 7, 32, 33 and 1000, block sizes 1, 4, 32 and >= length, GQA 16/4 and 4/4, D 64 and 128; fp32
to 1e-5, bf16 within 2x the reference's own bf16 error; gradients against the reference's autograd; the
decode form against the full recompute; bad input rejected by name. On CUDA (bf16/fp16, D 64/128) the
forward (both kernels: flash2 everywhere, hopper on sm_90), backward and decode form run; fp32 runs on the CPU."""
import pytest
import torch

import llada_engine
from llada_engine.ops import (block_attention, block_attention_decode, block_attention_decode_ref,
                              block_attention_ref, block_mask_dense)
from op_testing import DEVICES, assert_close_to_reference

pytestmark = pytest.mark.kernels

DOC_LENGTHS = [1, 7, 32, 33, 1000]
CPU = ["cpu"]  # ops and dtypes that only the CPU kernels implement so far


def make_packed(lengths_q, lengths_k=None, *, heads=(4, 4), dim=64, device="cpu", dtype=torch.float32, seed=0):
    """Random q [Tq, Hq, D], k, v [Tk, Hkv, D] and int32 cu_seqlens for the given document lengths."""
    lengths_k = lengths_q if lengths_k is None else lengths_k
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(sum(lengths_q), hq, dim, generator=g)
    k = torch.randn(sum(lengths_k), hkv, dim, generator=g)
    v = torch.randn(sum(lengths_k), hkv, dim, generator=g)
    cu = [torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
          for lengths in (lengths_q, lengths_k)]
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cu[0], cu[1],
            max(lengths_q, default=0), max(lengths_k, default=0))


def bd3_lengths(halves):
    return [2 * n for n in halves]


def fp32_reference(args, **kw):
    q, k, v, *rest = args
    return block_attention_ref(q.float(), k.float(), v.float(), *rest, return_lse=True, **kw)


def cuda_kernel_or_skip(kernel: str) -> str:
    """The CUDA `kernel` ("flash2" runs on any sm_80+ GPU; "hopper" on sm_90, where the build must have it)."""
    if kernel == "hopper":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Hopper kernels run on sm_90 GPUs")
        assert "90a" in llada_engine.build_info()["cuda_archs"], "an sm_90 GPU, but no sm_90a code in this build"
    return kernel


CUDA_KERNELS = ["flash2", "hopper"]


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
@pytest.mark.parametrize("block_size", [1, 4, 32, 1000])
def test_forward_fp32_matches_reference(device, mask, block_size):
    lengths = DOC_LENGTHS if mask == "block_causal" else bd3_lengths(DOC_LENGTHS)
    args = make_packed(lengths, heads=(4, 4), dim=64, device=device, seed=block_size)
    out, lse = block_attention(*args, block_size=block_size, mask=mask, return_lse=True)
    ref_out, ref_lse = fp32_reference(args, block_size=block_size, mask=mask)
    assert_close_to_reference(out, ref_out, atol=1e-5, name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-5, name="lse")


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
def test_forward_gqa_d128(device, mask):
    halves = [1, 7, 32, 33, 300]
    lengths = halves if mask == "block_causal" else bd3_lengths(halves)
    args = make_packed(lengths, heads=(16, 4), dim=128, device=device, seed=1)
    out, lse = block_attention(*args, block_size=32, mask=mask, return_lse=True)
    ref_out, ref_lse = fp32_reference(args, block_size=32, mask=mask)
    assert_close_to_reference(out, ref_out, atol=1e-5, name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-5, name="lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
@pytest.mark.parametrize("block_size", [4, 32])
def test_forward_bf16_within_twice_reference_error(device, mask, block_size):
    lengths = DOC_LENGTHS if mask == "block_causal" else bd3_lengths([1, 7, 32, 33, 500])
    args = make_packed(lengths, heads=(16, 4), dim=64, device=device, dtype=torch.bfloat16, seed=2)
    out, lse = block_attention(*args, block_size=block_size, mask=mask, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = fp32_reference(args, block_size=block_size, mask=mask)
    ref_lowp = block_attention_ref(*args, block_size=block_size, mask=mask)
    assert_close_to_reference(out, ref_out, ref_lowp, name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-4, name="lse")


@pytest.mark.parametrize("device", CPU)
def test_block_causal_bottom_right_and_empty_documents(device):
    # Fewer queries than keys (a block against its prefix), more queries than keys (leading queries
    # see nothing: out 0, lse -inf), and documents with no queries or no keys.
    lengths_q = [5, 7, 0, 40, 3, 6]
    lengths_k = [37, 7, 4, 9, 0, 70]
    args = make_packed(lengths_q, lengths_k, heads=(4, 2), dim=24, device=device, seed=3)
    for block_size in (1, 4, 8):
        out, lse = block_attention(*args, block_size=block_size, return_lse=True)
        ref_out, ref_lse = fp32_reference(args, block_size=block_size, mask="block_causal")
        assert_close_to_reference(out, ref_out, atol=1e-5)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        assert_close_to_reference(lse[finite], ref_lse[finite], atol=1e-5, name="lse")
        assert (out[torch.isinf(lse)] == 0).all()


@pytest.mark.parametrize("device", CPU)
def test_strided_inputs_and_odd_head_dim(device):
    T, hq, hkv, D = 70, 4, 2, 40
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(T, hq + 2 * hkv, D, generator=g).to(device)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cu = torch.tensor([0, 33, 70], dtype=torch.int32, device=device)
    out = block_attention(q, k, v, cu, cu, 37, 37, block_size=5)
    ref = block_attention_ref(q, k, v, cu, cu, block_size=5)
    assert_close_to_reference(out, ref, atol=1e-5)


def reference_grads(args, dout, dlse, *, upcast=True, **kw):
    """Gradients of the reference, in fp32 (upcast) or in the inputs' own dtype (its low-precision error)."""
    cast = (lambda t: t.detach().float()) if upcast else (lambda t: t.detach().clone())
    q, k, v, *rest = [cast(a).requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    out, lse = block_attention_ref(q, k, v, *rest, return_lse=True, **kw)
    finite = torch.isfinite(lse)
    ((out.float() * dout.float()).sum() + (lse[finite].float() * dlse.float()[finite]).sum()).backward()
    return q.grad, k.grad, v.grad


def assert_grads_within_twice_reference_error(args, dout, dlse, *, kernel=None, rows=slice(None), **kw):
    """Our dq, dk, dv (rows `rows` of each) within twice the low-precision reference's error; returns ours."""
    refs = reference_grads(args, dout, dlse, **kw)
    lowp = reference_grads(args, dout, dlse, upcast=False, **kw)
    ours = our_grads(args, dout, dlse, kernel=kernel, **kw)
    for name, o, r, l in zip(("dq", "dk", "dv"), ours, refs, lowp):
        assert o.dtype == args[0].dtype
        assert_close_to_reference(o[rows], r[rows], l[rows], name=name)
    return ours


def our_grads(args, dout, dlse, **kw):
    q, k, v, *rest = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                      for a in args]
    out, lse = block_attention(q, k, v, *rest, return_lse=True, **kw)
    finite = torch.isfinite(lse)
    ((out.float() * dout.float()).sum() + (lse[finite] * dlse[finite]).sum()).backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
@pytest.mark.parametrize("block_size,heads,dim", [(1, (4, 4), 64), (4, (4, 2), 32), (32, (16, 4), 128),
                                                  (2048, (4, 4), 64)])
def test_gradients_match_reference_autograd(device, mask, block_size, heads, dim):
    halves = [1, 7, 32, 33, 1000] if dim == 64 else [1, 7, 32, 33, 150]
    lengths = halves if mask == "block_causal" else bd3_lengths(halves)
    args = make_packed(lengths, heads=heads, dim=dim, device=device, seed=5)
    g = torch.Generator().manual_seed(6)
    dout = torch.randn(args[0].shape, generator=g).to(device)
    dlse = torch.randn(args[0].shape[:2], generator=g).to(device)
    kw = dict(block_size=block_size, mask=mask)
    for name, ours, ref in zip(("dq", "dk", "dv"), our_grads(args, dout, dlse, **kw),
                               reference_grads(args, dout, dlse, **kw)):
        assert_close_to_reference(ours, ref, atol=2e-5 * max(1.0, ref.abs().max().item()), name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
@pytest.mark.parametrize("block_size,heads,dim", [(1, (4, 4), 64), (4, (16, 4), 128), (32, (16, 4), 64),
                                                  (2048, (4, 4), 128)])
def test_gradients_cuda_within_twice_reference_error(kernel, dtype, mask, block_size, heads, dim):
    halves = [1, 7, 32, 33, 200]
    lengths = halves if mask == "block_causal" else bd3_lengths(halves)
    args = make_packed(lengths, heads=heads, dim=dim, device="cuda", dtype=dtype, seed=block_size + dim)
    g = torch.Generator().manual_seed(16)
    dout = torch.randn(args[0].shape, generator=g).to("cuda", dtype)
    dlse = torch.randn(args[0].shape[:2], generator=g).to("cuda")
    kw = dict(block_size=block_size, mask=mask)
    assert_grads_within_twice_reference_error(args, dout, dlse, kernel=cuda_kernel_or_skip(kernel), **kw)


@pytest.mark.gpu
def test_gradients_cuda_strided_inputs_and_unseen_keys():
    # k and v sliced from one fused projection; a document with keys and no query gets zero dk and dv.
    qkv = torch.randn(147, 8, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(6, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = qkv[:, :2], qkv[:, 2:4]
    cu_q = torch.tensor([0, 5, 5, 6], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 37, 77, 147], dtype=torch.int32, device="cuda")
    args = (q, k, v, cu_q, cu_k, 5, 70)
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:2], device="cuda")
    kw = dict(block_size=8)
    ours = assert_grads_within_twice_reference_error(args, dout, dlse, **kw)
    assert (ours[1][37:77] == 0).all() and (ours[2][37:77] == 0).all()


@pytest.mark.parametrize("device", CPU)
def test_gradient_through_lse_only(device):
    args = make_packed(bd3_lengths([3, 40]), heads=(4, 2), dim=32, device=device, seed=15)
    ours = [t.clone().requires_grad_() for t in args[:3]]
    refs = [t.clone().requires_grad_() for t in args[:3]]
    block_attention(*ours, *args[3:], block_size=4, mask="bd3", return_lse=True)[1].sum().backward()
    block_attention_ref(*refs, *args[3:], block_size=4, mask="bd3", return_lse=True)[1].sum().backward()
    for name, o, r in zip(("dq", "dk", "dv"), ours, refs):
        expected = r.grad if r.grad is not None else torch.zeros_like(r)  # lse does not depend on v
        assert_close_to_reference(o.grad, expected, atol=2e-5, name=name)


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
def test_gradients_bf16_within_twice_reference_error(device, mask):
    lengths = [1, 7, 32, 33, 200] if mask == "block_causal" else bd3_lengths([1, 7, 32, 33, 200])
    args = make_packed(lengths, heads=(16, 4), dim=64, device=device, dtype=torch.bfloat16, seed=7)
    g = torch.Generator().manual_seed(8)
    dout = torch.randn(args[0].shape, generator=g).to(device, torch.bfloat16)
    dlse = torch.zeros(args[0].shape[:2], device=device)
    kw = dict(block_size=4, mask=mask)
    refs = reference_grads(args, dout, dlse, **kw)
    q, k, v, *rest = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                      for a in args]
    block_attention_ref(q, k, v, *rest, **kw).backward(dout)
    lowp = (q.grad, k.grad, v.grad)
    ours = our_grads(args, dout, dlse, **kw)
    for name, o, r, l in zip(("dq", "dk", "dv"), ours, refs, lowp):
        assert o.dtype == torch.bfloat16
        assert_close_to_reference(o, r, l, name=name)


DECODE_CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16),
                pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,dtype", DECODE_CASES)
@pytest.mark.parametrize("Lb", [1, 4, 32])
def test_decode_equals_full_recompute(device, dtype, Lb):
    B, hq, hkv, D, blocks_max = 4, 16, 4, 64, 5
    cached_blocks = [0, 1, 4, 2]
    g = torch.Generator().manual_seed(9 + Lb)
    seqs = [[torch.randn((n + 1) * Lb, h, D, generator=g).to(device, dtype) for h in (hq, hkv, hkv)]
            for n in cached_blocks]
    k_cache = torch.randn(B, blocks_max * Lb, hkv, D, generator=g).to(device, dtype)  # garbage past the lengths
    v_cache = torch.randn(B, blocks_max * Lb, hkv, D, generator=g).to(device, dtype)
    for b, (q, k, v) in enumerate(seqs):
        k_cache[b, :len(k) - Lb] = k[:-Lb]
        v_cache[b, :len(v) - Lb] = v[:-Lb]
    q_new = torch.stack([q[-Lb:] for q, _, _ in seqs])
    k_new = torch.stack([k[-Lb:] for _, k, _ in seqs])
    v_new = torch.stack([v[-Lb:] for _, _, v in seqs])
    cache_seqlens = torch.tensor([n * Lb for n in cached_blocks], dtype=torch.int32, device=device)
    out, lse = block_attention_decode(q_new, k_cache, v_cache, cache_seqlens, k_new, v_new, return_lse=True)

    lengths = [len(q) for q, _, _ in seqs]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    full, full_lse = block_attention(torch.cat([s[0] for s in seqs]), torch.cat([s[1] for s in seqs]),
                                     torch.cat([s[2] for s in seqs]), cu, cu, max(lengths), max(lengths),
                                     block_size=Lb, return_lse=True)
    last = torch.cat([torch.arange(int(e) - Lb, int(e)) for e in cu[1:].tolist()]).to(device)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_to_reference(out.reshape(-1, hq, D).float(), full[last].float(), atol=tol)
    assert_close_to_reference(lse.reshape(-1, hq), full_lse[last], atol=1e-4)
    ref, ref_lse = block_attention_decode_ref(q_new.float(), k_cache.float(), v_cache.float(), cache_seqlens,
                                              k_new.float(), v_new.float(), return_lse=True)
    ref_lowp = block_attention_decode_ref(q_new, k_cache, v_cache, cache_seqlens, k_new, v_new)
    assert_close_to_reference(out, ref, ref_lowp if dtype != torch.float32 else None, atol=1e-5)
    assert_close_to_reference(lse, ref_lse, atol=1e-4, name="lse")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16,
                                                                               marks=pytest.mark.gpu)])
def test_decode_partial_cache_against_reference(device, dtype):
    B, Lb, hq, hkv, D, smax = 3, 7, 4, 1, 128, 50
    g = torch.Generator().manual_seed(10)
    q = torch.randn(B, Lb, hq, D, generator=g).to(device, dtype)
    k_cache, v_cache = (torch.randn(B, smax, hkv, D, generator=g).to(device, dtype) for _ in range(2))
    k_new, v_new = (torch.randn(B, Lb, hkv, D, generator=g).to(device, dtype) for _ in range(2))
    cache_seqlens = torch.tensor([13, 0, 50], dtype=torch.int32, device=device)
    out = block_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale=0.2)
    ref = block_attention_decode_ref(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, k_new.float(),
                                     v_new.float(), softmax_scale=0.2)
    ref_lowp = block_attention_decode_ref(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale=0.2)
    assert_close_to_reference(out, ref, ref_lowp if dtype != torch.float32 else None, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[3000], [2900, 0, 64]])
def test_decode_cuda_long_caches_split_the_keys(lens):
    # Few sequences and long caches: the keys are split into runs (split-KV) whose partial results are merged;
    # a sequence without cache rows leaves most runs empty.
    g = torch.Generator().manual_seed(25)
    B, Smax = len(lens), 3008
    q, k_new, v_new = (torch.randn(B, 32, h, 128, generator=g).to("cuda", torch.bfloat16) for h in (16, 4, 4))
    k_cache, v_cache = (torch.randn(B, Smax, 4, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out, lse = block_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, return_lse=True)
    ref, ref_lse = block_attention_decode_ref(q.float(), k_cache.float(), v_cache.float(), cache_seqlens,
                                              k_new.float(), v_new.float(), return_lse=True)
    ref_lowp = block_attention_decode_ref(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    assert_close_to_reference(out, ref, ref_lowp, name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-3, name="lse")


@pytest.mark.gpu
def test_decode_cuda_takes_cache_seqlens_from_the_cpu():
    g = torch.Generator().manual_seed(24)
    q, k_new, v_new = (torch.randn(3, 32, h, 128, generator=g).to("cuda", torch.bfloat16) for h in (16, 4, 4))
    k_cache, v_cache = (torch.randn(3, 96, 4, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    lens = torch.tensor([64, 0, 96], dtype=torch.int32)
    on_gpu = block_attention_decode(q, k_cache, v_cache, lens.cuda(), k_new, v_new)
    assert torch.equal(block_attention_decode(q, k_cache, v_cache, lens, k_new, v_new), on_gpu)
    with pytest.raises(ValueError, match=r"cache_seqlens\[2\] = 97 is outside"):
        block_attention_decode(q, k_cache, v_cache, lens + 1, k_new, v_new)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
@pytest.mark.parametrize("block_size,heads,dim", [(1, (4, 4), 64), (4, (16, 4), 128), (32, (16, 4), 64),
                                                  (2048, (4, 4), 128)])
def test_forward_cuda_within_twice_reference_error(kernel, dtype, mask, block_size, heads, dim):
    lengths = DOC_LENGTHS if mask == "block_causal" else bd3_lengths(DOC_LENGTHS)
    args = make_packed(lengths, heads=heads, dim=dim, device="cuda", dtype=dtype, seed=block_size)
    out, lse = block_attention(*args, block_size=block_size, mask=mask, return_lse=True,
                               kernel=cuda_kernel_or_skip(kernel))
    ref_out, ref_lse = fp32_reference(args, block_size=block_size, mask=mask)
    ref_lowp = block_attention_ref(*args, block_size=block_size, mask=mask)
    assert_close_to_reference(out, ref_out, ref_lowp, name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-3, name="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("mask,block_size", [("block_causal", 1), ("block_causal", 32), ("bd3", 32), ("bd3", 160)])
def test_cuda_tile_edges_forward_and_gradients(kernel, mask, block_size):
    # Documents ending just before, at and after the kernels' tile edges (64 and 128 rows), one of length 1.
    kernel = cuda_kernel_or_skip(kernel)
    halves = [1, 63, 64, 65, 127, 128, 129, 300]
    lengths = bd3_lengths(halves) if mask == "bd3" else halves
    args = make_packed(lengths, heads=(8, 2), dim=128, device="cuda", dtype=torch.bfloat16, seed=21)
    kw = dict(block_size=block_size, mask=mask)
    out, lse = block_attention(*args, return_lse=True, kernel=kernel, **kw)
    ref_out, ref_lse = fp32_reference(args, **kw)
    assert_close_to_reference(out, ref_out, block_attention_ref(*args, **kw), name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-3, name="lse")
    g = torch.Generator().manual_seed(26)
    dout = torch.randn(args[0].shape, generator=g).to("cuda", torch.bfloat16)
    dlse = torch.randn(args[0].shape[:2], generator=g).to("cuda")
    assert_grads_within_twice_reference_error(args, dout, dlse, kernel=kernel, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_documents_do_not_leak(kernel):
    # Tiles that run past a document's end read the next document's rows: none of it may reach the output or a
    # gradient of another document, not even an infinite value.
    kernel = cuda_kernel_or_skip(kernel)
    args = list(make_packed([40, 90, 20], heads=(4, 2), dim=64, device="cuda", dtype=torch.bfloat16, seed=22))
    for i in (0, 1, 2):
        args[i][40:130] = float("inf")
    q, k, v, cu_q, cu_k, mq, mk = args
    keep = torch.ones(150, dtype=torch.bool, device="cuda")
    keep[40:130] = False
    out = block_attention(q, k, v, cu_q, cu_k, mq, mk, block_size=4, kernel=kernel)
    ref = block_attention_ref(q.float(), k.float(), v.float(), cu_q, cu_k, block_size=4)
    assert_close_to_reference(out[keep], ref[keep], block_attention_ref(q, k, v, cu_q, cu_k, block_size=4)[keep])
    dout = torch.randn(out.shape, device="cuda").to(torch.bfloat16)
    dout[40:130] = float("inf")
    dlse = torch.zeros(out.shape[:2], device="cuda")
    assert_grads_within_twice_reference_error(args, dout, dlse, kernel=kernel, rows=keep, block_size=4)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_forward_cuda_bottom_right_empty_documents_and_strides(kernel):
    kernel = cuda_kernel_or_skip(kernel)
    lengths_q, lengths_k = [5, 7, 0, 40, 3, 6], [37, 7, 4, 9, 0, 70]
    args = make_packed(lengths_q, lengths_k, heads=(4, 2), dim=64, device="cuda", dtype=torch.bfloat16, seed=3)
    out, lse = block_attention(*args, block_size=4, return_lse=True, kernel=kernel)
    ref_out, ref_lse = fp32_reference(args, block_size=4, mask="block_causal")
    assert_close_to_reference(out, ref_out, block_attention_ref(*args, block_size=4), name="out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    qkv = torch.randn(70, 8, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 33, 70], dtype=torch.int32, device="cuda")
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    ref = block_attention_ref(q.float(), k.float(), v.float(), cu, cu, block_size=5)
    assert_close_to_reference(block_attention(q, k, v, cu, cu, 37, 37, block_size=5, kernel=kernel), ref,
                              block_attention_ref(q, k, v, cu, cu, block_size=5))


@pytest.mark.gpu
def test_forward_cuda_auto_kernel_and_unaligned_rows():
    args = make_packed([33, 70], heads=(4, 2), dim=64, device="cuda", dtype=torch.bfloat16, seed=23)
    auto = block_attention(*args, block_size=4)
    assert torch.equal(auto, block_attention(*args, block_size=4, kernel="flash2"))   # until hopper passes on a card
    expect = "hopper" if torch.cuda.get_device_capability() == (9, 0) else "flash2"
    # Rows 65 elements apart: the TMA of the Hopper forward cannot load them; "auto" falls back to flash2.
    wide = torch.randn(103, 8, 65, device="cuda", dtype=torch.bfloat16)[..., :64]
    cu = torch.tensor([0, 33, 103], dtype=torch.int32, device="cuda")
    q, k, v = wide[:, :4], wide[:, 4:6], wide[:, 6:]
    ref = block_attention_ref(q.float(), k.float(), v.float(), cu, cu, block_size=4)
    assert_close_to_reference(block_attention(q, k, v, cu, cu, 70, 70, block_size=4), ref,
                              block_attention_ref(q, k, v, cu, cu, block_size=4))
    if expect == "hopper":
        with pytest.raises(ValueError, match="hopper.*16-byte aligned rows"):
            block_attention(q, k, v, cu, cu, 70, 70, block_size=4, kernel="hopper")
    else:
        with pytest.raises(RuntimeError, match="hopper.*needs an sm_90 GPU"):
            block_attention(*args, block_size=4, kernel="hopper")


@pytest.mark.gpu
@pytest.mark.parametrize("change,match", [(dict(dim=32), "head dim of q must be 64 or 128 on CUDA"),
                                          (dict(dtype=torch.float32), "q must be bfloat16 or float16 on CUDA")])
def test_forward_cuda_bad_arguments_are_named(change, match):
    kw = dict(heads=(4, 2), dim=64, device="cuda", dtype=torch.bfloat16) | change
    with pytest.raises((ValueError, TypeError), match=match):
        block_attention(*make_packed([6, 10], **kw), block_size=2)



@pytest.mark.gpu
def test_forward_cuda_device_mismatch_is_named():
    q, k, v, cu_q, cu_k, mq, mk = make_packed([6, 10], heads=(4, 2), dim=64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cu_seqlens_q is on cpu but q is on cuda"):
        block_attention(q, k, v, cu_q.cpu(), cu_k, mq, mk, block_size=2)

def test_dense_mask_examples():
    bd3 = block_mask_dense("bd3", 2, 8, 8).int().tolist()
    assert bd3 == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                   [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
                   [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert torch.equal(block_mask_dense("block_causal", 1, 5, 5), torch.ones(5, 5, dtype=torch.bool).tril())
    assert block_mask_dense("block_causal", 100, 5, 5).all()
    assert block_mask_dense("block_causal", 2, 2, 6).int().tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def _bad(change):
    args = list(make_packed([6, 10], heads=(4, 2), dim=16, seed=11))
    kw = dict(block_size=2, mask="bd3")
    names = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
    for key, value in change.items():
        if key in names:
            i = names.index(key)
            args[i] = value(args[i]) if callable(value) else value
        else:
            kw[key] = value
    return args, kw


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 10, 6, 16], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 6, 10, 16], dtype=torch.int32)), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_k=lambda c: torch.tensor([0, 6, 15], dtype=torch.int32)), "cu_seqlens_k must end at the tensor length"),
    (dict(cu_seqlens_q=lambda c: torch.tensor([1, 6, 16], dtype=torch.int32)), r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_q=lambda c: c.long()), "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=lambda c: c[:2]), r"cu_seqlens_k must be \[S \+ 1\]"),
    (dict(q=lambda q: q[:15], cu_seqlens_q=lambda c: torch.tensor([0, 5, 15], dtype=torch.int32)),
     "bd3.*even length"),
    (dict(k=lambda k: torch.cat([k, k[:, :1]], 1), v=lambda v: torch.cat([v, v[:, :1]], 1)),
     "multiple of the heads of k"),
    (dict(q=lambda q: q.double()), "q must be float32 or bfloat16"),
    (dict(q=lambda q: q.half()), "q must be float32 or bfloat16"),
    (dict(k=lambda k: k.bfloat16()), "k and v must have the dtype of q"),
    (dict(v=lambda v: v[:, :, :8]), "v must have the shape of k"),
    (dict(q=lambda q: q[0]), r"q must be \[Tq, Hq, D\]"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(mask="causal"), 'mask must be "block_causal" or "bd3"'),
    (dict(max_seqlen_q=5), r"max_seqlen_q \(5\) is below the longest query sequence"),
    (dict(softmax_scale=float("nan")), "softmax_scale must be finite"),
    (dict(softmax_scale=1e39), r"softmax_scale must be finite in float32 \(\|softmax_scale\| < 3.4e38\), got 1e\+39"),
    (dict(max_seqlen_q=2**40), r"max_seqlen_q must be in \[0, 2\^31 - 1\], got 1099511627776"),
    (dict(cu_seqlens_k=lambda c: c.to("meta")), "cu_seqlens_k is on meta but q is on cpu"),
    (dict(kernel="hopper"), 'kernel "hopper" names a CUDA kernel, but q is on the CPU'),
    (dict(kernel="fast"), 'kernel must be "auto", "flash2" or "hopper"'),
])
def test_bad_arguments_are_named(change, match):
    args, kw = _bad(change)
    with pytest.raises((ValueError, TypeError), match=match):
        block_attention(*args, **kw)


@pytest.mark.parametrize("change,match", [
    (dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), r"cache_seqlens\[1\] = 9 is outside"),
    (dict(cache_seqlens=torch.tensor([3, -1], dtype=torch.int32)), r"cache_seqlens\[1\] = -1 is outside"),
    (dict(cache_seqlens=torch.tensor([3, 1])), "cache_seqlens must be int32"),
    (dict(k_new=lambda t: t[:, :2]), r"k_new must be \[B, Lb, Hkv, D\]"),
    (dict(v_cache=lambda t: t[:, :4]), "v_cache must have the shape of k_cache"),
    (dict(q=lambda t: t[:, :, :3]), "must be a multiple of the heads of k_cache"),
    (dict(k_cache=lambda t: t.bfloat16()), "k_cache must have the dtype of q"),
])
def test_decode_bad_arguments_are_named(change, match):
    g = torch.Generator().manual_seed(12)
    kw = dict(q=torch.randn(2, 3, 4, 8, generator=g), k_cache=torch.randn(2, 8, 2, 8, generator=g),
              v_cache=torch.randn(2, 8, 2, 8, generator=g), cache_seqlens=torch.tensor([3, 8], dtype=torch.int32),
              k_new=torch.randn(2, 3, 2, 8, generator=g), v_new=torch.randn(2, 3, 2, 8, generator=g))
    for key, value in change.items():
        kw[key] = value(kw[key]) if callable(value) else value
    with pytest.raises((ValueError, TypeError), match=match):
        block_attention_decode(**kw)


def opcheck_samples(device):
    """(args, kwargs) samples for torch.library.opcheck of the llada::block_attention_* ops (on CUDA in
    bf16/fp16 with D 64)."""
    samples = {"block_attention_fwd": [], "block_attention_bwd": [], "block_attention_decode": []}
    cuda = device.startswith("cuda")
    cases = (("bd3", torch.float16 if cuda else torch.float32, [6, 0, 10]),
             ("block_causal", torch.bfloat16, [1, 9, 4]))
    for mask, dtype, lengths in cases:
        q, k, v, cu_q, cu_k, mq, mk = make_packed(lengths, heads=(4, 2), dim=64 if cuda else 16, device=device,
                                                  dtype=dtype, seed=13)
        kw = dict(block_size=2, mask=mask, softmax_scale=0.3)
        samples["block_attention_fwd"].append(((q, k, v, cu_q, cu_k, mq, mk), kw))
        grad = [t.clone().requires_grad_() for t in (q, k, v)]
        samples["block_attention_fwd"].append(((*grad, cu_q, cu_k, mq, mk), kw))
        out, lse = torch.ops.llada.block_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, **kw)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse) if mask == "bd3" else None
        samples["block_attention_bwd"].append(((dout, q, k, v, out, lse, dlse, cu_q, cu_k, mq, mk), kw))
        if cuda:
            samples["block_attention_fwd"].append(((q, k, v, cu_q, cu_k, mq, mk), kw | dict(kernel="flash2")))
            samples["block_attention_bwd"].append(((dout, q, k, v, out, lse, dlse, cu_q, cu_k, mq, mk),
                                                   kw | dict(kernel="flash2")))
    g = torch.Generator().manual_seed(14)
    d, dtype = (64, torch.bfloat16) if cuda else (16, torch.float32)
    decode = [torch.randn(*shape, generator=g).to(device, dtype) for shape in
              ((2, 3, 4, d), (2, 8, 2, d), (2, 8, 2, d), (2, 3, 2, d), (2, 3, 2, d))]
    lens = torch.tensor([5, 0], dtype=torch.int32, device=device)
    samples["block_attention_decode"].append(((decode[0], decode[1], decode[2], lens, decode[3], decode[4]),
                                              dict(softmax_scale=0.25)))
    pools = [torch.randn(3, 8, 2, d, generator=g).to(device, dtype) for _ in range(2)]  # paged: 3 pages of 8 rows
    table = torch.tensor([[2, 0], [1, -1]], dtype=torch.int32, device=device)
    lens = torch.tensor([13, 0], dtype=torch.int32, device=device)
    samples["block_attention_decode"].append(((decode[0], *pools, lens, decode[3], decode[4]),
                                              dict(softmax_scale=0.25, block_table=table)))
    return samples
