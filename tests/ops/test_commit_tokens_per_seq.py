"""commit_tokens with one threshold / temperature / top_k / top_p / seed / offset per sequence: one batched call
equals the calls on each sequence alone with its own numbers, bit for bit (greedy and sampled sequences mixed,
fp32 and bf16 logits, odd vocabularies, B = 1), in any order of the batch; it matches the reference; the
device flag `invalid` reports NaN logits without raising (check_finite=False), per sequence; bad values are
named; and the call compiles with fullgraph=True."""
import pytest
import torch

from llada_engine.ops import commit_tokens, commit_tokens_, commit_tokens_ref
from op_testing import DEVICES
from ops.test_commit_tokens import assert_same, make_block

pytestmark = pytest.mark.kernels

NAMES = ("threshold", "temperature", "top_k", "top_p", "seed", "offset")


def mixed_params(B, *, seed=0):
    """Per-sequence parameters cycling through greedy, filtered argmax and sampled sequences, as numbers."""
    kinds = [dict(temperature=0.0, top_k=0, top_p=1.0),          # greedy
             dict(temperature=0.8, top_k=0, top_p=1.0),
             dict(temperature=0.0, top_k=7, top_p=0.9),          # filtered, argmax
             dict(temperature=1.3, top_k=40, top_p=0.8),
             dict(temperature=1.0, top_k=1, top_p=1.0),
             dict(temperature=0.6, top_k=0, top_p=0.5)]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        kind = kinds[(b + seed) % len(kinds)]
        rows.append(dict(threshold=float(torch.rand((), generator=g)) * 0.9, seed=int(torch.randint(0, 2**40, (), generator=g)),
                         offset=int(torch.randint(0, 50, (), generator=g)), **kind))
    return rows


def as_tensors(rows, device):
    dtypes = dict(threshold=torch.float32, temperature=torch.float32, top_k=torch.int32, top_p=torch.float32,
                  seed=torch.int64, offset=torch.int64)
    return {n: torch.tensor([r[n] for r in rows], dtype=dtypes[n], device=device) for n in NAMES}


def assert_identical(a, b, what):
    for name in ("tokens", "committed", "confidence", "candidates", "invalid"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{what}: {name} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,V", [(7, 32, 999), (6, 5, 4099), (1, 8, 1001), (12, 3, 1)])
def test_batched_call_equals_each_sequence_alone(device, dtype, B, L, V):
    tokens, logits, mask_id = make_block(B, L, V, device=device, dtype=dtype, scale=2.0, seed=B * 7 + V)
    rows = mixed_params(B, seed=V)
    min_commit = torch.randint(0, 4, (B,), dtype=torch.int32, generator=torch.Generator().manual_seed(1)).to(device)
    batched = commit_tokens(tokens, logits, mask_id=mask_id, min_commit=min_commit, **as_tensors(rows, device))
    for b, r in enumerate(rows):
        alone = commit_tokens(tokens[b:b + 1], logits[b:b + 1], mask_id=mask_id, min_commit=min_commit[b:b + 1], **r)
        assert_identical(row_of(batched, b), alone, f"sequence {b}")
    inplace = tokens.clone()
    res = commit_tokens_(inplace, logits, mask_id=mask_id, min_commit=min_commit, **as_tensors(rows, device))
    assert res.tokens is inplace
    assert_identical(res, batched, "in place")


def row_of(result, b):
    """Sequence b of a CommitResult, as a batch of one."""
    return type(result)(*(t[b:b + 1] for t in result))


@pytest.mark.parametrize("device", DEVICES)
def test_a_sequence_gets_the_same_tokens_wherever_it_sits(device):
    B, L, V = 9, 32, 777
    tokens, logits, mask_id = make_block(B, L, V, device=device, scale=1.5, seed=2)
    rows = mixed_params(B, seed=3)
    min_commit = torch.full((B,), 2, dtype=torch.int32, device=device)
    out = commit_tokens(tokens, logits, mask_id=mask_id, min_commit=min_commit, **as_tensors(rows, device))
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(4))
    shuffled = commit_tokens(tokens[perm], logits[perm], mask_id=mask_id, min_commit=min_commit[perm],
                             **as_tensors([rows[i] for i in perm.tolist()], device))
    for field in out._fields:
        assert torch.equal(getattr(shuffled, field), getattr(out, field)[perm.to(device)]), field


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_one_draws_the_same_either_way(device):
    tokens, logits, mask_id = make_block(1, 32, 500, device=device, scale=1.0, seed=5)
    kw = dict(mask_id=mask_id, min_commit=1, threshold=0.4, temperature=1.0, top_k=30, seed=99, offset=3)
    scalar = commit_tokens(tokens, logits, **kw)
    one_tensor = commit_tokens(tokens, logits, **(kw | dict(seed=torch.tensor([99]))))
    assert_identical(scalar, one_tensor, "B = 1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sequence_matches_reference(device, dtype):
    B, L, V = 8, 32, 1001
    tokens, logits, mask_id = make_block(B, L, V, device=device, dtype=dtype, scale=2.0, seed=6)
    rows = mixed_params(B, seed=7)
    kw = dict(mask_id=mask_id, min_commit=torch.full((B,), 2, dtype=torch.int32, device=device),
              **as_tensors(rows, device))
    out, ref = commit_tokens(tokens, logits, **kw), commit_tokens_ref(tokens, logits, **kw)
    greedy = torch.tensor([r["temperature"] == 0.0 for r in rows], device=device)
    assert torch.equal(out.candidates[greedy], ref.candidates[greedy])
    # A draw can differ only when the uniform lands within rounding of a CDF step: allow 1 in 100.
    agree = (out.candidates == ref.candidates).float().mean().item()
    assert agree >= 0.99, f"only {agree:.3f} of the draws equal the reference's"
    if agree == 1.0:
        assert_same(out, ref, conf_tol=1e-5)


def test_reference_per_sequence_equals_reference_alone():
    B, L, V = 5, 16, 300
    tokens, logits, mask_id = make_block(B, L, V, device="cpu", scale=1.5, seed=8)
    rows = mixed_params(B, seed=9)
    batched = commit_tokens_ref(tokens, logits, mask_id=mask_id, min_commit=1, **as_tensors(rows, "cpu"))
    for b, r in enumerate(rows):
        alone = commit_tokens_ref(tokens[b:b + 1], logits[b:b + 1], mask_id=mask_id, min_commit=1, **r)
        assert_identical(row_of(batched, b), alone, f"reference, sequence {b}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [100, 40009])
def test_nan_sets_the_flag_without_raising(device, V):
    B, L = 4, 8
    tokens, logits, mask_id = make_block(B, L, V, device=device, seed=10)
    tokens[1, 3] = mask_id
    logits[1, 3, V - 17] = float("nan")        # masked position: confidence NaN, never committed
    logits[2, 0] = float("-inf")               # no finite maximum
    tokens[3, 5] = 0
    logits[3, 5, 2] = float("nan")             # not masked: still flagged
    rows = mixed_params(B, seed=11)
    for per_seq in (False, True):
        kw = dict(mask_id=mask_id, min_commit=L, check_finite=False)
        kw |= as_tensors(rows, device) if per_seq else dict(threshold=0.5)
        out = commit_tokens(tokens, logits, **kw)
        assert out.invalid.tolist() == [False, True, True, True]
        assert torch.isnan(out.confidence[1, 3]) and not out.committed[1, 3] and out.tokens[1, 3] == mask_id
        assert not out.committed[2, 0] and torch.isneginf(out.confidence[3, 5])
        assert out.committed[1].sum() == (tokens[1] == mask_id).sum() - 1, "the other positions commit as usual"
        ref = commit_tokens_ref(tokens, logits, **kw)
        assert torch.equal(out.invalid, ref.invalid)
        if not per_seq:  # greedy: everything exact
            assert torch.equal(out.committed, ref.committed) and torch.equal(out.tokens, ref.tokens)
        with pytest.raises(ValueError, match="NaN"):
            commit_tokens(tokens, logits, **(kw | dict(check_finite=True)))
        inplace = tokens.clone()
        res = commit_tokens_(inplace, logits, **kw)
        assert torch.equal(res.invalid, out.invalid) and torch.equal(inplace, out.tokens)
    clean = commit_tokens(tokens[:1], logits[:1], mask_id=mask_id, threshold=0.5, min_commit=1, check_finite=False)
    assert not clean.invalid.any()


@pytest.mark.gpu
def test_cuda_parameters_from_the_cpu_equal_parameters_on_the_device():
    B, L, V = 6, 32, 40009
    tokens, logits, mask_id = make_block(B, L, V, device="cuda", dtype=torch.bfloat16, seed=12)
    rows = mixed_params(B, seed=13)
    kw = dict(mask_id=mask_id, min_commit=2)
    on_device = commit_tokens(tokens, logits, **kw, **as_tensors(rows, "cuda"))
    from_host = commit_tokens(tokens, logits, **kw, **as_tensors(rows, "cpu"))
    assert_identical(on_device, from_host, "parameters from the CPU")
    with pytest.raises(ValueError, match=r"top_p\[0\] = 0 is outside \(0, 1\]"):
        commit_tokens(tokens, logits, **kw, **(as_tensors(rows, "cpu") | dict(top_p=torch.zeros(B))))


@pytest.mark.parametrize("name,value,match", [
    ("threshold", torch.tensor([0.5, 1.5]), r"threshold\[1\] = 1.5 is outside \[0, 1\]"),
    ("temperature", torch.tensor([float("nan"), 0.0]), r"temperature\[0\] = nan is outside"),
    ("temperature", torch.tensor([0.0, -1.0]), r"temperature\[1\] = -1 is outside"),
    ("top_k", torch.tensor([0, -2]), r"top_k\[1\] = -2 is outside \[0, inf\)"),
    ("top_p", torch.tensor([0.0, 1.0]), r"top_p\[0\] = 0 is outside \(0, 1\]"),
    ("top_p", torch.tensor([1.0, 1.0, 1.0]), r"top_p must be a number or a tensor of shape \[B\] = \[2\]"),
    ("seed", torch.tensor([[1, 2]]), r"seed must be a number or a tensor of shape \[B\]"),
    ("seed", 1.5, "seed must be an int or a tensor"),
    ("threshold", float("nan"), r"threshold must be in \[0, 1\], got nan"),
])
def test_bad_per_sequence_values_are_named(name, value, match):
    tokens, logits, mask_id = make_block(2, 8, 100, device="cpu", seed=14)
    kw = dict(mask_id=mask_id, threshold=0.5, min_commit=1, temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0)
    kw[name] = value
    with pytest.raises((ValueError, TypeError), match=match):
        commit_tokens(tokens, logits, **kw)


def test_op_checks_dtypes_and_devices_by_name():
    tokens, logits, mask_id = make_block(2, 8, 100, device="cpu", seed=15)
    args = [torch.full((2,), 0.5), torch.zeros(2), torch.zeros(2, dtype=torch.int32), torch.ones(2),
            torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
    min_commit = torch.ones(2, dtype=torch.int32)
    bad = list(args)
    bad[2] = bad[2].long()
    with pytest.raises(TypeError, match="top_k must be Int"):
        torch.ops.llada.commit_tokens_per_seq(tokens, logits, min_commit, *bad, mask_id=mask_id)
    bad = list(args)
    bad[4] = bad[4].int()
    with pytest.raises(TypeError, match="seed must be Long"):
        torch.ops.llada.commit_tokens_per_seq(tokens, logits, min_commit, *bad, mask_id=mask_id)


def test_compiles_without_graph_break():
    B, L, V = 3, 8, 64
    tokens, logits, mask_id = make_block(B, L, V, device="cpu", seed=16)
    params = as_tensors(mixed_params(B, seed=17), "cpu")

    def step(tokens, logits, threshold, temperature, top_k, top_p, seed, offset):
        out = commit_tokens(tokens, logits, mask_id=mask_id, min_commit=1, threshold=threshold,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                            check_finite=False)
        return out.tokens, out.invalid

    # aot_eager: dynamo (no graph break) and the fake implementation, without inductor's code generation.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(tokens, logits, *(params[n] for n in NAMES))
    want = step(tokens, logits, *(params[n] for n in NAMES))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
