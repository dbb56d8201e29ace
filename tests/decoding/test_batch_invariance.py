"""Batch invariance, bit for bit: every per-token piece of the model (RMSNorm, RoPE, the router's linear and
selection, the routed experts' grouped GEMM, the commit) gives each row the same result alone or in a batch
of any size, in fp32, bf16 and fp16; and the embedded default model, in bf16 and fp32, decodes every prompt of
random mixed batches (1-12 prompts of 1-60 tokens) to the same tokens as alone, greedy and seeded sampled
(prompt i alone with seed + i), with and without the KV cache. The linear op's own property test is in
tests/ops/test_linear.py; benchmarks/batch_invariance.py runs the 100-batch sweep."""
import random

import pytest
import torch

import llada_engine
from llada_engine.model.modules import RMSNorm, apply_rotary, rotary_tables
from llada_engine.ops import commit_tokens, linear, moe_experts, moe_grouped_gemm, moe_route

pytestmark = pytest.mark.kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 5, 16, 17, 33, 100]


def assert_rows_invariant(fn, x, name):
    """fn(x[rows]) equals fn(x)[rows] for prefixes, suffixes and single rows of x (the batch dimension 0)."""
    full = fn(x)
    for m in ROWS:
        if m > x.shape[0]:
            continue
        assert torch.equal(fn(x[:m]), full[:m]), f"{name}: the first {m} rows differ from the full batch's"
        assert torch.equal(fn(x[-m:]), full[-m:]), f"{name}: the last {m} rows differ from the full batch's"
    for i in (0, 7, x.shape[0] - 1):
        assert torch.equal(fn(x[i:i + 1]), full[i:i + 1]), f"{name}: row {i} alone differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_and_rope_are_per_row(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 4, 64, generator=g).to(dtype)
    norm = RMSNorm(64, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        assert_rows_invariant(norm, x, "RMSNorm")
    positions = torch.randint(0, 4096, (100,), generator=g)

    full = apply_rotary(x, *rotary_tables(positions, 32, 600000.0, dtype))
    for m in ROWS:
        part = apply_rotary(x[-m:], *rotary_tables(positions[-m:], 32, 600000.0, dtype))
        assert torch.equal(part, full[-m:]), f"RoPE: the last {m} rows differ"
        part = apply_rotary(x[:m], *rotary_tables(positions[:m], 32, 600000.0, dtype))
        assert torch.equal(part, full[:m]), f"RoPE: the first {m} rows differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_is_per_row(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 256, generator=g).to(dtype)
    gate = torch.randn(16, 256, generator=g).to(dtype) * 0.1
    bias = torch.randn(16, generator=g) * 0.1

    def route(xs):
        ids, weights = moe_route(linear(xs.float(), gate.float()), bias, top_k=2, n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5)
        return torch.cat([ids.float(), weights], dim=1)

    assert_rows_invariant(route, x, "router")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_experts_are_per_row(dtype):
    """One path and one reduction order whatever the rows per expert: a token's experts' output is the same
    alone (one row per expert) or among 100 tokens (many rows per expert)."""
    g = torch.Generator().manual_seed(3)
    E, k, H, I = 16, 2, 256, 128
    x = torch.randn(100, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    ids = torch.rand(100, E, generator=g).argsort(dim=1)[:, :k].int()
    weights = torch.rand(100, k, generator=g)
    # the grouped GEMM alone (fp16 too): rows of one expert, every count, and each row alone
    b = w13[5:6]
    whole = moe_grouped_gemm(x, b, torch.tensor([0, 100], dtype=torch.int32))
    for m in ROWS:
        assert torch.equal(moe_grouped_gemm(x[:m], b, torch.tensor([0, m], dtype=torch.int32)), whole[:m])
        assert torch.equal(moe_grouped_gemm(x[-m:], b, torch.tensor([0, m], dtype=torch.int32)), whole[-m:])
    if dtype == torch.float16:
        return  # permutation takes fp32 and bf16 on the CPU
    full = moe_experts(x, ids, weights, w13, w2)
    for m in ROWS:
        assert torch.equal(moe_experts(x[-m:], ids[-m:], weights[-m:], w13, w2), full[-m:]), f"last {m} rows"
    for i in (0, 7, 99):
        assert torch.equal(moe_experts(x[i:i + 1], ids[i:i + 1], weights[i:i + 1], w13, w2), full[i:i + 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_commit_is_per_row(dtype):
    g = torch.Generator().manual_seed(4)
    B, L, V = 12, 8, 300
    logits = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
    tokens = torch.where(torch.rand(B, L, generator=g) < 0.6, 2, torch.randint(3, V, (B, L), generator=g))

    def commit(rows):
        r = commit_tokens(tokens[rows], logits[rows], mask_id=2, threshold=0.5, min_commit=1)
        return torch.cat([r.tokens.float(), r.confidence.float()], dim=1)

    full = commit(slice(None))
    for b in range(B):
        assert torch.equal(commit(slice(b, b + 1)), full[b:b + 1]), f"row {b} alone differs"
    assert torch.equal(commit(slice(3, 9)), full[3:9])


def random_batches(n, cfg, seed):
    """n batches of 1-12 prompts of 1-60 tokens (never the mask or EOS id)."""
    rng = random.Random(seed)
    tokens = [t for t in range(cfg.vocab_size) if t not in (cfg.mask_token_id, cfg.eos_token_id)]
    return [[[rng.choice(tokens) for _ in range(rng.randint(1, 60))] for _ in range(rng.randint(1, 12))]
            for _ in range(n)]


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=str)
def default_model(request):
    return llada_engine.load_model("default", dtype=request.param)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_default_model_decodes_each_prompt_as_alone(default_model, sampled, use_cache):
    settings = dict(gen_length=8, block_length=8, steps=8, threshold=0.9, use_cache=use_cache)
    if sampled:
        settings.update(temperature=1.0)
    batches = random_batches(2, default_model.config, seed=17 * sampled + use_cache)
    batches[0] = batches[0] + [[5]] * (12 - len(batches[0]))   # one batch of 12 prompts, one of 1 token
    for k, batch in enumerate(batches):
        together = llada_engine.generate(default_model, batch, seed=k, **settings).sequences
        for i, prompt in enumerate(batch):
            alone = llada_engine.generate(default_model, [prompt], seed=k + i, **settings).sequences[0]
            assert alone == together[i], f"batch {k}, prompt {i} of {len(batch)} (length {len(prompt)})"
