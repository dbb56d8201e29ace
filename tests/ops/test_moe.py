"""The MoE ops against their references on every device: routing exact (ids) and within 1e-6 (weights),
including group-limited cases where the plain top-k differs; permutation exact; the grouped GEMM against
the loop over groups (empty groups, one group holding every row, M = 0, odd K and N, both b layouts),
bf16 within 2x the reference's own bf16 error; gradients against the reference's autograd (zero for
unused experts); moe_experts against the official loop; bad input rejected by name."""
import pytest
import torch

from llada_engine.ops import (moe_experts, moe_experts_ref, moe_grouped_gemm, moe_grouped_gemm_ref, moe_permute,
                              moe_permute_ref, moe_route, moe_route_ref, moe_unpermute, moe_unpermute_ref)
from op_testing import DEVICES, assert_close_to_reference

pytestmark = pytest.mark.kernels

ROUTE_CONFIGS = [  # (T, E, top_k, n_group, topk_group)
    (1, 8, 2, 4, 2), (37, 16, 4, 4, 2), (64, 64, 8, 8, 4), (19, 256, 8, 8, 4), (5, 12, 3, 12, 5), (9, 6, 6, 1, 1)]


def random_offsets(M, E, *, generator, empty=()):
    """int32 [E + 1] offsets splitting M rows into E groups at random, the groups in `empty` left empty."""
    weights = torch.rand(E, generator=generator)
    weights[list(empty)] = 0
    counts = torch.floor(weights / weights.sum() * M).long() if weights.sum() > 0 else torch.zeros(E, dtype=torch.long)
    nonempty = [g for g in range(E) if g not in set(empty)]
    counts[nonempty[0]] += M - counts.sum()
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()


def route_inputs(T, E, *, device, seed, bias_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * bias_scale
    return logits.to(device), bias.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,top_k,n_group,topk_group", ROUTE_CONFIGS)
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_reference(device, T, E, top_k, n_group, topk_group, norm):
    logits, bias = route_inputs(T, E, device=device, seed=T * E + top_k)
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm)
    ids, weights = moe_route(logits, bias, **kw)
    ref_ids, ref_weights = moe_route_ref(logits, bias, **kw)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_route_group_limit_and_bias_matter(device):
    T, E = 256, 64
    logits, bias = route_inputs(T, E, device=device, seed=7, bias_scale=1.0)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=1.0)
    ids, weights = moe_route(logits, bias, **kw)
    ref_ids, ref_weights = moe_route_ref(logits, bias, **kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)
    plain_biased = torch.topk(torch.sigmoid(logits) + bias, 8, dim=-1).indices
    plain_unbiased = torch.topk(torch.sigmoid(logits), 8, dim=-1).indices
    differs = lambda other: (ids.long().sort(-1).values != other.sort(-1).values).any(-1)  # noqa: E731
    assert differs(plain_biased).any(), "the case should hit the group limit"
    assert differs(plain_unbiased).any(), "the case should make the bias change the choice"
    groups = ids.long() // (E // 8)
    assert all(len(set(row)) <= 4 for row in groups.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_go_to_the_lower_index(device):
    # Equal logits everywhere: every group ties, every expert ties.
    logits = torch.zeros(3, 16, device=device)
    ids, weights = moe_route(logits, None, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(weights, torch.full((3, 4), 0.25, device=device))
    ref_ids, _ = moe_route_ref(logits, None, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_low_precision_logits(device, dtype):
    logits, bias = route_inputs(33, 32, device=device, seed=3)
    logits = logits.to(dtype)
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ids, weights = moe_route(logits, bias, **kw)
    ref_ids, ref_weights = moe_route_ref(logits, bias, **kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)


def random_ids(T, E, k, *, generator):
    return torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]).int() if T else \
        torch.empty(0, k, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k,H", [(1, 4, 1, 3), (37, 16, 4, 24), (0, 8, 2, 5), (100, 7, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_unpermute_match_reference(device, T, E, k, H, dtype):
    g = torch.Generator().manual_seed(T + E)
    ids = random_ids(T, E, k, generator=g).to(device)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    out = moe_permute(x, ids, E)
    ref = moe_permute_ref(x, ids, E)
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype and torch.equal(got, want)
    weights = torch.rand(T, k, generator=g).to(device)
    y = torch.randn(T * k, H, generator=g).to(dtype).to(device)
    got = moe_unpermute(y, out[2], weights)
    want = moe_unpermute_ref(y.float(), out[2], weights)
    assert_close_to_reference(got, want, moe_unpermute_ref(y, out[2], weights), atol=1e-5)


def test_permute_accepts_int64_ids_and_skewed_experts():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(50, 3, dtype=torch.int64)
    ids[:, 1:] = torch.randint(1, 3, (50, 2), generator=g)
    x = torch.randn(50, 8, generator=g)
    out = moe_permute(x, ids, 5)
    ref = moe_permute_ref(x, ids, 5)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert out[1].tolist()[3:] == [150, 150, 150]  # experts 3 and 4 get nothing


@pytest.fixture(params=["kernel", "aten"])
def cpu_gemm(request, monkeypatch):
    """Runs a test with each CPU grouped-GEMM backend (llada kernel, ATen per group); no effect on CUDA."""
    monkeypatch.setenv("LLADA_MOE_CPU_GEMM", request.param)
    return request.param


# The CPU kernels take fp32 and bf16 of any size; the CUDA grouped GEMMs bf16 with N and K multiples of 8.
GEMM_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def per_device(cpu_cases, cuda_cases):
    """pytest params (device, *case): the CPU cases on the CPU, the CUDA cases marked gpu."""
    return ([pytest.param("cpu", *c) for c in cpu_cases]
            + [pytest.param("cuda", *c, marks=pytest.mark.gpu) for c in cuda_cases])


def assert_close_to_fp64(out, ref_fn, inputs, *, name="output"):
    """Results of fp32 inputs within 1e-5 of the fp64 reference; results of any bf16 input (an fp32 gradient
    of topk_weights in a bf16 layer too) within 2x the reference's own error on the same inputs."""
    ref = ref_fn(*[t.double() if t.is_floating_point() else t for t in inputs]).float()
    if all(t.dtype in (torch.float32, torch.float64) for t in inputs if t.is_floating_point()):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        assert_close_to_reference(out.float(), ref, ref_fn(*inputs).float(), atol=1e-2, name=name)


GEMM_CASES_CPU = [  # (M, N, K, E, empty groups); groups of <= 16 rows take the CPU kernel's streaming path
    (64, 48, 32, 4, ()), (53, 37, 19, 5, (1, 3)), (40, 33, 65, 3, (0, 2)), (0, 16, 8, 4, (0, 1, 2, 3)),
    (1, 1, 1, 1, ()), (300, 70, 130, 9, (8,)), (30, 40, 37, 10, (4,))]
GEMM_CASES_CUDA = [
    (64, 48, 32, 4, ()), (53, 40, 24, 5, (1, 3)), (40, 32, 72, 3, (0, 2)), (0, 16, 8, 4, (0, 1, 2, 3)),
    (1, 8, 8, 1, ()), (300, 72, 136, 9, (8,)), (1000, 256, 512, 16, (3, 4))]


def gemm_inputs(device, M, N, K, E, empty, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = random_offsets(M, E, generator=g, empty=empty) if M else torch.zeros(E + 1, dtype=torch.int32)
    dtype = GEMM_DTYPE[device]
    a = torch.randn(M, K, generator=g).to(dtype).to(device)
    b = torch.randn(E, N, K, generator=g).to(dtype).to(device)
    return a, b, offsets.to(device)


@pytest.mark.parametrize("device,M,N,K,E,empty", per_device(GEMM_CASES_CPU, GEMM_CASES_CUDA))
@pytest.mark.parametrize("transposed_b", [False, True])
def test_grouped_gemm_matches_loop(cpu_gemm, device, M, N, K, E, empty, transposed_b):
    a, b, offsets = gemm_inputs(device, M, N, K, E, empty, seed=M * 7 + K)
    if transposed_b:
        b = b.transpose(1, 2).contiguous().transpose(1, 2)  # same values, N-contiguous storage
    out = moe_grouped_gemm(a, b, offsets)
    assert out.dtype == a.dtype
    assert_close_to_fp64(out, moe_grouped_gemm_ref, (a, b, offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_every_group_size_around_the_streaming_limit(cpu_gemm, device):
    sizes = [1, 8, 9, 15, 16, 17, 0, 33]  # the CPU kernel streams groups of up to 16 rows, packs larger ones
    offsets = torch.tensor([0] + sizes).cumsum(0).to(torch.int32).to(device)
    g = torch.Generator().manual_seed(21)
    K = 37 if device == "cpu" else 40
    a = torch.randn(sum(sizes), K, generator=g).to(GEMM_DTYPE[device]).to(device)
    b = torch.randn(len(sizes), 40, K, generator=g).to(GEMM_DTYPE[device]).to(device)
    assert_close_to_fp64(moe_grouped_gemm(a, b, offsets), moe_grouped_gemm_ref, (a, b, offsets))


@pytest.mark.parametrize("device,M,N,K,E", per_device([(97, 41, 23, 6)], [(97, 40, 24, 6)]))
def test_grouped_gemm_one_group_holds_every_row(cpu_gemm, device, M, N, K, E):
    a, b, _ = gemm_inputs(device, M, N, K, E, (), seed=5)
    offsets = torch.tensor([0, 0, 0, M, M, M, M], dtype=torch.int32, device=device)
    out = moe_grouped_gemm(a, b, offsets)
    assert_close_to_fp64(out, lambda x, w: x @ w.t(), (a, b[2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K,E,empty", [(56, 40, 24, 5, (1,)), (256, 96, 160, 8, (2, 5)), (24, 40, 40, 8, (3,))])
def test_grouped_gemm_bf16_within_reference_error(cpu_gemm, device, M, N, K, E, empty):
    g = torch.Generator().manual_seed(M + N)
    offsets = random_offsets(M, E, generator=g, empty=empty).to(device)
    a = torch.randn(M, K, generator=g).bfloat16().to(device)
    b = torch.randn(E, N, K, generator=g).bfloat16().to(device)
    out = moe_grouped_gemm(a, b, offsets)
    assert out.dtype == torch.bfloat16
    assert_close_to_fp64(out, moe_grouped_gemm_ref, (a, b, offsets))


@pytest.mark.parametrize("device,M,N,K,E,empty", per_device(
    [(53, 37, 19, 5, (1, 3)), (0, 8, 6, 3, (0, 1, 2)), (120, 65, 33, 4, ())],
    [(53, 40, 24, 5, (1, 3)), (0, 8, 8, 3, (0, 1, 2)), (120, 64, 32, 4, ())]))
def test_grouped_gemm_gradients(cpu_gemm, device, M, N, K, E, empty):
    a, b, offsets = gemm_inputs(device, M, N, K, E, empty, seed=M + 3)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(a.dtype).to(device)
    a.requires_grad_()
    b.requires_grad_()
    da, db = torch.autograd.grad(moe_grouped_gemm(a, b, offsets), (a, b), grad)

    def ref_grads(aa, bb, gg):
        aa, bb = aa.detach().requires_grad_(), bb.detach().requires_grad_()
        return torch.autograd.grad(moe_grouped_gemm_ref(aa, bb, offsets), (aa, bb), gg)

    assert_close_to_fp64(da, lambda *t: ref_grads(*t)[0], (a.detach(), b.detach(), grad), name="grad of a")
    assert_close_to_fp64(db, lambda *t: ref_grads(*t)[1], (a.detach(), b.detach(), grad), name="grad of b")
    for e in empty:
        assert (db[e] == 0).all(), f"expert {e} got no row and must get a zero gradient"


@pytest.mark.parametrize("device,N,K", per_device([(40, 29)], [(40, 32)]))
@pytest.mark.parametrize("bounds", [[0, 10, 10, 25, 60, 77], [0, 10, 10, 210, 250, 300]])  # 2nd: a group > 64 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_wgrad(cpu_gemm, device, N, K, bounds, dtype):
    if device == "cuda":
        dtype = torch.bfloat16
    g = torch.Generator().manual_seed(11)
    M, E = bounds[-1], len(bounds) - 1
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    a = torch.randn(M, K, generator=g).to(dtype).to(device)
    grad = torch.randn(M, N, generator=g).to(dtype).to(device)
    db = torch.ops.llada.moe_grouped_gemm_wgrad(grad, a, offsets)

    def loop(gr, aa):
        return torch.stack([gr[bounds[e]:bounds[e + 1]].t() @ aa[bounds[e]:bounds[e + 1]] for e in range(E)])

    assert_close_to_fp64(db, loop, (grad, a))
    assert (db[1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,E,empty", GEMM_CASES_CPU)
def test_grouped_gemm_fp32_any_size_on_cuda(M, N, K, E, empty):
    """fp32 on CUDA (CUTLASS SIMT kernels) takes odd sizes: forward and both gradients vs the fp64 loop."""
    g = torch.Generator().manual_seed(M + K)
    offsets = random_offsets(M, E, generator=g, empty=empty) if M else torch.zeros(E + 1, dtype=torch.int32)
    offsets = offsets.cuda()
    a = torch.randn(M, K, generator=g).cuda().requires_grad_()
    b = torch.randn(E, N, K, generator=g).cuda().requires_grad_()
    grad = torch.randn(M, N, generator=g).cuda()
    out = moe_grouped_gemm(a, b, offsets)
    da, db = torch.autograd.grad(out, (a, b), grad)
    ra, rb = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = moe_grouped_gemm_ref(ra, rb, offsets)
    rda, rdb = torch.autograd.grad(ref, (ra, rb), grad.double())
    for name, got, want in (("out", out, ref), ("grad of a", da, rda), ("grad of b", db, rdb)):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")


def expert_inputs(T, E, k, H, I, *, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    ids, weights = moe_route_ref(logits, torch.randn(E, generator=g) * 0.2, top_k=k, n_group=1, topk_group=1,
                                 routed_scaling_factor=2.5)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return (x.to(dtype).to(device), ids.to(device), weights.to(device), w13.to(dtype).to(device),
            w2.to(dtype).to(device))


EXPERT_CASES_CPU = [(1, 4, 2, 8, 6), (37, 16, 4, 24, 20), (64, 32, 8, 48, 40), (3, 64, 8, 16, 8)]
EXPERT_CASES_CUDA = [(1, 4, 2, 8, 8), (37, 16, 4, 24, 16), (64, 32, 8, 48, 40), (3, 64, 8, 16, 8)]


@pytest.mark.parametrize("device,T,E,k,H,I", per_device(EXPERT_CASES_CPU, EXPERT_CASES_CUDA))
def test_experts_match_official_loop(device, T, E, k, H, I):
    x, ids, weights, w13, w2 = expert_inputs(T, E, k, H, I, device=device, dtype=GEMM_DTYPE[device], seed=T + E)
    assert_close_to_fp64(moe_experts(x, ids, weights, w13, w2), moe_experts_ref, (x, ids, weights, w13, w2))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,H,I", EXPERT_CASES_CPU)
def test_experts_fp32_any_size_on_cuda(T, E, k, H, I):
    x, ids, weights, w13, w2 = expert_inputs(T, E, k, H, I, device="cuda", seed=T + E)
    assert_close_to_fp64(moe_experts(x, ids, weights, w13, w2), moe_experts_ref, (x, ids, weights, w13, w2))


@pytest.mark.parametrize("device", DEVICES)
def test_experts_bf16_within_reference_error(device):
    x, ids, weights, w13, w2 = expert_inputs(64, 16, 4, 64, 48, device=device, dtype=torch.bfloat16, seed=1)
    out = moe_experts(x, ids, weights, w13, w2)
    assert out.dtype == torch.bfloat16
    assert_close_to_fp64(out, moe_experts_ref, (x, ids, weights, w13, w2))


@pytest.mark.parametrize("device", DEVICES)
def test_experts_gradients_match_official_loop(cpu_gemm, device):
    T, E, k, H, I = 13, 32, 2, 16, 16  # 26 slots over 32 experts: several experts get no token
    x, ids, weights, w13, w2 = expert_inputs(T, E, k, H, I, device=device, dtype=GEMM_DTYPE[device], seed=4)
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(x.dtype).to(device)
    inputs = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    grads = torch.autograd.grad(moe_experts(inputs[0], ids, *inputs[1:]), inputs, grad)

    def ref_grad(i):
        def fn(xx, ww, a13, a2, gg):
            leaves = [t.detach().requires_grad_() for t in (xx, ww, a13, a2)]
            return torch.autograd.grad(moe_experts_ref(leaves[0], ids, *leaves[1:]), leaves, gg)[i]
        return fn

    for i, name in enumerate(("x", "topk_weights", "w13", "w2")):
        assert_close_to_fp64(grads[i], ref_grad(i), (x, weights, w13, w2, grad), name=f"grad of {name}")
    unused = sorted(set(range(E)) - set(ids.flatten().tolist()))
    assert unused, "the case should leave some experts without tokens"
    assert (grads[2][unused] == 0).all() and (grads[3][unused] == 0).all()


# ---- NaN: propagated per token as the reference does, never raised ---------------------------------

NAN = float("nan")
ROUTE_NAN_CASES = {  # name: (T, E, top_k, n_group, topk_group), [(token, expert) of the NaN logits], bias NaN
    "one logit": ((6, 16, 4, 4, 2), [(2, 5)], []),
    "a whole token": ((6, 16, 4, 4, 2), [(1, e) for e in range(16)], []),
    "two in one group": ((6, 16, 4, 4, 2), [(3, 8), (3, 10)], []),
    "in two groups, the later first": ((6, 16, 4, 4, 2), [(0, 13), (0, 2)], []),
    "more NaN than top_k": ((5, 16, 2, 4, 2), [(4, e) for e in (1, 5, 9, 13)], []),
    "one group of one expert each": ((5, 12, 3, 12, 5), [(0, 7), (2, 0), (2, 11)], []),
    "a single group": ((9, 6, 6, 1, 1), [(8, 3)], []),
    "one bias": ((6, 16, 4, 4, 2), [], [6]),
    "bias and logits": ((6, 16, 4, 4, 2), [(5, 1)], [9]),
    "wide, every token": ((3, 256, 8, 8, 4), [(0, 200), (1, 7), (1, 100), (2, 255)], []),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ROUTE_NAN_CASES))
@pytest.mark.parametrize("norm", [True, False])
def test_route_nan_follows_the_reference(device, name, norm):
    (T, E, top_k, n_group, topk_group), at, bias_at = ROUTE_NAN_CASES[name]
    logits, bias = route_inputs(T, E, device=device, seed=T + E)
    for t, e in at:
        logits[t, e] = NAN
    bias[bias_at] = NAN
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm)
    ids, weights = moe_route(logits, bias, **kw)
    ref_ids, ref_weights = moe_route_ref(logits, bias, **kw)
    assert torch.equal(ids, ref_ids), f"{name}: {ids.tolist()} != {ref_ids.tolist()}"
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6, equal_nan=True)
    nan_tokens = sorted({t for t, _ in at})
    assert weights[nan_tokens].isnan().any(-1).all(), "a token with a NaN logit shows it in its weights"
    clean = [t for t in range(T) if t not in nan_tokens]
    assert weights[clean].isfinite().all(), "no other token is touched"
    assert ((ids >= 0) & (ids < E)).all(), "ids stay valid experts"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_one_token_stays_in_its_row_of_the_experts(device, dtype):
    """The MoE layer's ops on a batch where one token's hidden state is NaN: that token's output row is NaN,
    every other row is what the batch without it gives (the model's one NaN sequence fails alone)."""
    T, E, k, H, I = 9, 8, 2, 16, 8
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    router = (torch.randn(E, H, generator=g) / H**0.5).to(device)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype).to(device)
    bias = (torch.randn(E, generator=g) * 0.2).to(device)
    kw = dict(top_k=k, n_group=4, topk_group=2, routed_scaling_factor=2.5)

    def layer(x, route, experts):
        ids, weights = route(x.float() @ router.t(), bias, **kw)
        return experts(x, ids, weights, w13, w2)

    poisoned = x.clone()
    poisoned[4] = NAN
    out = layer(poisoned, moe_route, moe_experts)
    assert out[4].isnan().all()
    rest = [t for t in range(T) if t != 4]
    assert out[rest].isfinite().all()
    torch.testing.assert_close(out[rest], layer(x, moe_route, moe_experts)[rest])
    ref = layer(poisoned, moe_route_ref, moe_experts_ref)
    assert torch.equal(out.isnan(), ref.isnan())


# ---- bad input --------------------------------------------------------------------------------------

def test_route_rejects_bad_configuration():
    logits, bias = route_inputs(4, 16, device="cpu", seed=0)
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, bias, **dict(kw, top_k=17))
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, bias, **dict(kw, top_k=9))  # more than the 2 kept groups of 4 hold
    with pytest.raises(ValueError, match="n_group"):
        moe_route(logits, bias, **dict(kw, n_group=3))
    with pytest.raises(ValueError, match="topk_group"):
        moe_route(logits, bias, **dict(kw, topk_group=5))
    with pytest.raises(ValueError, match="expert_bias"):
        moe_route(logits, bias[:8], **kw)
    with pytest.raises(TypeError, match="expert_bias"):
        moe_route(logits, bias.double(), **kw)
    with pytest.raises(TypeError, match="router_logits"):
        moe_route(logits.int(), bias, **kw)
    with pytest.raises(ValueError, match=r"routed_scaling_factor must be finite in float32"):
        moe_route(logits, bias, **dict(kw, routed_scaling_factor=1e39))


def test_permute_and_unpermute_reject_bad_input():
    x = torch.randn(5, 4)
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    ids[2, 1] = 0  # the out-of-range substitutions below must hit at least one id
    with pytest.raises(ValueError, match="topk_ids"):
        moe_permute(x, torch.where(ids == 0, 4, ids), 4)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_permute(x, torch.where(ids == 0, -1, ids), 4)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_permute(x, ids[:3], 4)
    with pytest.raises(TypeError, match="topk_ids"):
        torch.ops.llada.moe_permute(x, ids.float(), 4)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts = 4\), got topk_ids\[1, 0\] = 7"):
        torch.ops.llada.moe_permute(x, torch.tensor([[0, 1], [7, 2], [0, 0], [1, 1], [2, 2]], dtype=torch.int32), 4)
    wide = ids.long()
    wide[3, 1] = 2**32 + 1  # would wrap to expert 1
    with pytest.raises(ValueError, match=r"topk_ids\[3, 1\] = 4294967297 is outside \[0, num_experts\) = \[0, 4\)"):
        moe_permute(x, wide, 4)
    with pytest.raises(ValueError, match=r"num_experts must be in \[1, 2\^31 - 1\], got 4294967297"):
        torch.ops.llada.moe_permute(x, ids, 2**32 + 1)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        moe_permute(x, ids.long(), 4.0)
    _, _, inverse = moe_permute(x, ids, 4)
    y, w = torch.randn(10, 4), torch.rand(5, 2)
    with pytest.raises(ValueError, match="inverse"):
        moe_unpermute(y, torch.where(inverse == 0, 10, inverse), w)
    with pytest.raises(ValueError, match="inverse"):
        moe_unpermute(y, inverse[:8], w)
    with pytest.raises(ValueError, match="y"):
        moe_unpermute(y[:9], inverse, w)
    with pytest.raises(TypeError, match="topk_weights"):
        moe_unpermute(y, inverse, w.double())
    with pytest.raises(ValueError, match="permutation"):
        torch.ops.llada.moe_unpermute_backward(torch.randn(5, 4), y, torch.zeros_like(inverse), w)


def test_grouped_gemm_rejects_bad_input():
    a, b = torch.randn(10, 8), torch.randn(3, 5, 8)
    offsets = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        moe_grouped_gemm(a, b, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at M"):
        moe_grouped_gemm(a, b, torch.tensor([0, 4, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        moe_grouped_gemm(a, b, torch.tensor([1, 4, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="offsets"):
        moe_grouped_gemm(a, b, offsets[:3])
    with pytest.raises(TypeError, match="offsets"):
        moe_grouped_gemm(a, b, offsets.long())
    with pytest.raises(ValueError, match="b"):
        moe_grouped_gemm(a, torch.randn(3, 5, 7), offsets)
    with pytest.raises(TypeError, match="a and b"):
        moe_grouped_gemm(a, b.bfloat16(), offsets)
    with pytest.raises(TypeError, match="a"):
        moe_grouped_gemm(a.double(), b.double(), offsets)
    with pytest.raises(ValueError, match="end at M"):
        torch.ops.llada.moe_grouped_gemm_wgrad(torch.randn(10, 5), a, torch.tensor([0, 4, 11], dtype=torch.int32))


def test_experts_rejects_bad_weights():
    x, ids, weights, w13, w2 = expert_inputs(4, 8, 2, 16, 8, device="cpu")
    with pytest.raises(ValueError, match="w13"):
        moe_experts(x, ids, weights, w13[:, :15], w2)
    with pytest.raises(ValueError, match="w2"):
        moe_experts(x, ids, weights, w13, w2[:, :, :7])
    with pytest.raises(TypeError, match=r"moe_experts: w13 must have the dtype of x \(torch.bfloat16\), got torch.float32"):
        moe_experts(x.bfloat16(), ids, weights, w13, w2)
    with pytest.raises(TypeError, match=r"moe_experts: w2 must have the dtype of x"):
        moe_experts(x, ids, weights, w13, w2.bfloat16())
    with pytest.raises(TypeError, match=r"moe_experts: topk_weights must be float32"):
        moe_experts(x, ids, weights.bfloat16(), w13, w2)
    with pytest.raises(ValueError, match=r"moe_experts: topk_ids must be \[T, k\] with T = 4"):
        moe_experts(x, ids[:3], weights, w13, w2)
    with pytest.raises(ValueError, match=r"moe_experts: topk_weights must have the shape of topk_ids"):
        moe_experts(x, ids, weights[:, :1], w13, w2)


@pytest.mark.gpu
def test_int64_ids_outside_the_experts_count_nowhere_on_cuda():
    x = torch.randn(3, 8, device="cuda")
    ids = torch.tensor([[0, 1], [2**32 + 1, 1], [1, -5]], device="cuda")
    _, offsets, _ = moe_permute(x, ids, 2)
    assert offsets.tolist() == [0, 1, 4]


def opcheck_samples(device):
    """(args, kwargs) samples for torch.library.opcheck of every llada::moe_* op."""
    g = torch.Generator().manual_seed(0)
    logits, bias = route_inputs(9, 16, device=device, seed=1)
    route_kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    T, E, k, H, N = 9, 5, 2, 16, 8
    dtype = GEMM_DTYPE[device]
    ids = random_ids(T, E, k, generator=g).to(device)
    x = torch.randn(T, H, generator=g).to(device)
    x_sorted, offsets, inverse = moe_permute_ref(x, ids, E)
    weights = torch.rand(T, k, generator=g).to(device)
    a = x_sorted.to(dtype)
    b = torch.randn(E, N, H, generator=g).to(dtype).to(device)
    grad_c = torch.randn(T * k, N, generator=g).to(dtype).to(device)
    grad_out = torch.randn(T, H, generator=g).to(device)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    return {
        "moe_route": [((logits, bias), route_kw), ((logits.bfloat16(), None), dict(route_kw, norm_topk_prob=False))],
        "moe_permute": [((x, ids, E), {}), ((req(x), ids, E), {}), ((x.bfloat16(), ids, E), {})],
        "moe_unpermute": [((x_sorted, inverse, weights), {}), ((req(x_sorted), inverse, req(weights)), {})],
        "moe_unpermute_backward": [((grad_out, x_sorted, inverse, weights), {})],
        "moe_grouped_gemm": [((a, b, offsets), {}), ((req(a), req(b), offsets), {}),
                             ((a.bfloat16(), b.bfloat16(), offsets), {})],
        "moe_grouped_gemm_wgrad": [((grad_c, a, offsets), {})],
    }


def test_route_weights_are_differentiable_in_the_logits():
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(9, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(16, generator=g) * 0.1
    kw = dict(top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ids, weights = moe_route(logits, bias, **kw)
    upstream = torch.randn(9, 3, generator=g)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_ids, ref_weights = moe_route_ref(ref_logits, bias, **kw)
    assert torch.equal(ids, ref_ids)
    (ref_grad,) = torch.autograd.grad((ref_weights * upstream).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    chosen = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, ids.long(), True)
    assert torch.all(grad[~chosen] == 0) and torch.all(grad[chosen] != 0)
