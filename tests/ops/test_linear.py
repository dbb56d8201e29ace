"""The batch-invariant linear op on every device and every CPU path (AMX, AVX-512, plain C++, forced by
LLADA_CPU_ISA): each row of a batched call equals the same row computed alone, bit for bit, in fp32, bf16 and
fp16, at batch sizes from 1 past every tile and work-item size, in any position and with any thread count;
results against the fp64 reference (bf16/fp16 within 2x the reference's own error); gradients; bad input
rejected by name."""
import pytest
import torch
import torch.nn.functional as F

import llada_engine
from llada_engine.ops import linear, linear_ref
from op_testing import DEVICES, assert_close_to_reference

pytestmark = pytest.mark.kernels

CPU_ISAS = ["best", "avx512", "portable"]
# Row counts around the CPU tiles (4 rows; AMX 16 and 32) and past a work item (AMX 256 rows; the dot-product
# path 256 KB of fp32 A rows: 128 rows at K = 512).
BATCH_SIZES = [1, 2, 3, 4, 5, 7, 15, 16, 17, 31, 32, 33, 47, 64, 100, 129, 255, 256, 257, 300]
SHAPES = [(512, 96), (256, 40), (37, 13), (64, 1), (1, 5), (520, 33)]   # (K, N): AMX takes K % 32 == 0 in bf16


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request, monkeypatch):
    """Runs a test under each cap on the CPU GEMM's instruction set; no effect on CUDA."""
    if request.param != "best":
        monkeypatch.setenv("LLADA_CPU_ISA", request.param)
    return request.param


def dtypes_for(device):
    return [torch.float32, torch.bfloat16, torch.float16] if device == "cpu" else [torch.float32, torch.bfloat16]


def inputs(M, N, K, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(device)
    return x, w


def test_the_switch_selects_the_cpu_path(cpu_isa):
    paths = llada_engine.build_info()["cpu_gemm_path"]
    assert set(paths) == {"float32", "bfloat16", "float16"}
    if cpu_isa == "portable":
        assert set(paths.values()) == {"portable"}
    if cpu_isa == "avx512":
        assert paths["bfloat16"] != "amx"
    assert all(p in ("amx", "avx512", "portable") for p in paths.values())
    assert paths["float32"] == paths["float16"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_each_row_alone_or_in_any_batch(cpu_isa, device, K, N):
    if device == "cuda" and (K % 8 or N % 8):
        K, N = (K + 7) // 8 * 8, (N + 7) // 8 * 8
    for dtype in dtypes_for(device):
        x, w = inputs(BATCH_SIZES[-1], N, K, dtype, device, seed=K + N)
        full = linear(x, w)
        for M in BATCH_SIZES:
            assert torch.equal(linear(x[:M], w), full[:M]), f"{dtype}: the first {M} rows differ from the full batch's"
            assert torch.equal(linear(x[-M:], w), full[-M:]), f"{dtype}: the last {M} rows differ from the full batch's"
        for i in (0, 1, 5, 63, 128, BATCH_SIZES[-1] - 1):
            assert torch.equal(linear(x[i:i + 1], w), full[i:i + 1]), f"{dtype}: row {i} alone differs"
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3)).to(device)
        assert torch.equal(linear(x[perm], w), full[perm]), f"{dtype}: rows in another order differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_results_do_not_depend_on_the_thread_count(cpu_isa, dtype):
    x, w = inputs(77, 200, 256, dtype, "cpu", seed=2)
    threads = torch.get_num_threads()
    want = linear(x, w)
    try:
        torch.set_num_threads(1)
        one = linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (0, 8, 16), (33, 40, 24), (130, 72, 520), (17, 1000, 256)])
def test_matches_reference(cpu_isa, device, M, N, K):
    for dtype in dtypes_for(device):
        if device == "cuda" and dtype == torch.bfloat16 and (N % 8 or K % 8):
            continue
        x, w = inputs(M, N, K, dtype, device, seed=M + K)
        out = linear(x, w)
        assert out.dtype == dtype and out.shape == (M, N)
        ref = F.linear(x.double(), w.double()).float()
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:
            assert_close_to_reference(out.float(), ref, F.linear(x, w).float(), atol=1e-2, name=str(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_bias_and_strided_weight(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 24, generator=g).to(device)
    wide = torch.randn(16, 40, generator=g).to(device)
    w = wide[:, 8:32]                      # [16, 24], rows 40 apart
    bias = torch.randn(16, generator=g).to(device)
    out = linear(x, w, bias)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x[0, 0], w), F.linear(x[0, 0], w), rtol=1e-5, atol=1e-5)   # x [K]
    torch.testing.assert_close(linear(x.transpose(0, 1), w.t().contiguous().t()), F.linear(x.transpose(0, 1), w),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_ref(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 24, generator=g).to(device).requires_grad_()
    w = torch.randn(16, 24, generator=g).to(device).requires_grad_()
    bias = torch.randn(16, generator=g).to(device).requires_grad_()
    grad = torch.randn(9, 16, generator=g).to(device)
    got = torch.autograd.grad(linear(x, w, bias), (x, w, bias), grad)
    want = torch.autograd.grad(F.linear(x, w, bias), (x, w, bias), grad)
    for a, b, name in zip(got, want, ("x", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="x must be"):
        torch.ops.llada.linear(torch.randn(2, 4, 8), w)
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, torch.randn(5, 7))
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.llada.linear(x, torch.randn(8))
    with pytest.raises(TypeError, match="one dtype"):
        linear(x, w.bfloat16())
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        linear(x.double(), w.double())
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        linear(x.int(), w.int())


@pytest.mark.gpu
def test_cuda_rejects_bf16_sizes_off_the_tile():
    x, w = torch.randn(4, 12).bfloat16().cuda(), torch.randn(5, 12).bfloat16().cuda()
    with pytest.raises(ValueError, match="multiples of 8"):
        linear(x, w)


def opcheck_samples(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 24, generator=g).to(device)
    w = torch.randn(16, 24, generator=g).to(device)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    return {"linear": [((x, w), {}), ((req(x), req(w)), {}), ((x.bfloat16(), w.bfloat16()), {})]}
