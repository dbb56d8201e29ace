"""commit_tokens against its reference on every device: greedy tokens and decisions exact, confidence
within 1e-6 (fp32 math on every input dtype), sampling reproducible and equal to the reference's draw,
the sampled distribution equal to the softmax (chi-square), and bad input rejected by name."""
import pytest
import torch

from llada_engine.ops import commit_tokens, commit_tokens_, commit_tokens_ref
from op_testing import DEVICES

pytestmark = pytest.mark.kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_block(B, L, V, *, device, dtype=torch.float32, scale=3.0, masked_fraction=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_id = V - 1
    tokens = torch.randint(0, max(V - 1, 1), (B, L), generator=g)
    tokens[torch.rand(B, L, generator=g) < masked_fraction] = mask_id
    logits = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    return tokens.to(device), logits.to(device), mask_id


def assert_same(out, ref, conf_tol=1e-6):
    assert torch.equal(out.candidates[ref.confidence > float("-inf")], ref.candidates[ref.confidence > float("-inf")])
    assert torch.equal(out.committed, ref.committed)
    assert torch.equal(out.tokens, ref.tokens)
    finite = torch.isfinite(ref.confidence)
    assert torch.equal(finite, torch.isfinite(out.confidence))
    # fp32 sums over V terms in different orders: a relative 1e-5 on large vocabularies.
    torch.testing.assert_close(out.confidence[finite], ref.confidence[finite], rtol=1e-5, atol=conf_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,V", [(1, 1, 1), (1, 32, 7), (3, 32, 1001), (2, 5, 4099), (64, 4, 257),
                                   (1, 3, 40009), (1, 32, 157184)])  # the last two split rows on CUDA
def test_greedy_matches_reference(device, dtype, B, L, V):
    tokens, logits, mask_id = make_block(B, L, V, device=device, dtype=dtype, seed=B * 1000 + V)
    for min_commit in (0, 1, 3, L + 5):
        for threshold in (0.0, 0.2, 0.95):
            kw = dict(mask_id=mask_id, threshold=threshold, min_commit=min_commit)
            out = commit_tokens(tokens, logits, **kw)
            ref = commit_tokens_ref(tokens, logits, **kw)
            assert torch.equal(out.candidates, ref.candidates)
            assert_same(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_path_on_peaked_logits(device):
    tokens, logits, mask_id = make_block(8, 32, 300, device=device, scale=12.0, masked_fraction=1.0, seed=1)
    ref = commit_tokens_ref(tokens, logits, mask_id=mask_id, threshold=0.9, min_commit=1)
    assert ref.committed.sum(1).gt(1).any(), "the case should commit several tokens per row by threshold"
    assert_same(commit_tokens(tokens, logits, mask_id=mask_id, threshold=0.9, min_commit=1), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_min_commit_and_edge_rows(device):
    tokens, logits, mask_id = make_block(4, 16, 50, device=device, seed=2)
    tokens[0] = 3                 # nothing masked
    tokens[1] = mask_id           # everything masked
    min_commit = torch.tensor([2, 16, 40, 0], dtype=torch.int32, device=device)
    out = commit_tokens(tokens, logits, mask_id=mask_id, threshold=0.99, min_commit=min_commit)
    ref = commit_tokens_ref(tokens, logits, mask_id=mask_id, threshold=0.99, min_commit=min_commit)
    assert_same(out, ref)
    assert not out.committed[0].any() and torch.equal(out.tokens[0], tokens[0])
    assert out.committed[1].all()
    assert out.committed[2].sum() == (tokens[2] == mask_id).sum()
    assert torch.isneginf(out.confidence[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_equals_functional(device):
    tokens, logits, mask_id = make_block(5, 32, 999, device=device, seed=3)
    kw = dict(mask_id=mask_id, threshold=0.5, min_commit=2, temperature=0.8, top_k=40, seed=11, offset=2)
    out = commit_tokens(tokens, logits, **kw)
    inplace = tokens.clone()
    res = commit_tokens_(inplace, logits, **kw)
    assert res.tokens is inplace
    assert torch.equal(inplace, out.tokens) and torch.equal(res.committed, out.committed)


SAMPLING = [dict(temperature=0.7), dict(temperature=1.0, top_k=20), dict(temperature=1.3, top_p=0.6),
            dict(temperature=1.0, top_k=50, top_p=0.9), dict(temperature=0.0, top_k=5, top_p=0.8),
            dict(temperature=0.5, top_k=1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampling_matches_reference(device, dtype, sampling):
    tokens, logits, mask_id = make_block(6, 32, 777, device=device, dtype=dtype, scale=2.0, seed=4)
    kw = dict(mask_id=mask_id, threshold=0.3, min_commit=2, seed=1234, offset=7, **sampling)
    out = commit_tokens(tokens, logits, **kw)
    ref = commit_tokens_ref(tokens, logits, **kw)
    # A draw can differ only when the uniform lands within rounding of a CDF step: allow 1 in 100.
    agree = (out.candidates == ref.candidates).float().mean().item()
    assert agree >= 0.99, f"only {agree:.3f} of the draws equal the reference's"
    same = out.candidates == ref.candidates
    conf_ok = (out.confidence - ref.confidence).abs() <= 1e-5
    assert (conf_ok | ~same | torch.isneginf(ref.confidence)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_reproducible_and_seeded(device):
    tokens, logits, mask_id = make_block(4, 32, 500, device=device, scale=1.0, seed=5)
    kw = dict(mask_id=mask_id, threshold=0.9, min_commit=1, temperature=1.0)
    a = commit_tokens(tokens, logits, seed=1, offset=0, **kw)
    b = commit_tokens(tokens, logits, seed=1, offset=0, **kw)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.candidates, commit_tokens(tokens, logits, seed=2, offset=0, **kw).candidates)
    assert not torch.equal(a.candidates, commit_tokens(tokens, logits, seed=1, offset=1, **kw).candidates)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_is_greedy(device):
    tokens, logits, mask_id = make_block(3, 32, 1234, device=device, seed=6)
    greedy = commit_tokens(tokens, logits, mask_id=mask_id, threshold=0.5, min_commit=1)
    top1 = commit_tokens(tokens, logits, mask_id=mask_id, threshold=0.5, min_commit=1, temperature=1.5, top_k=1,
                         seed=9)
    assert torch.equal(greedy.candidates, top1.candidates)
    masked = tokens == mask_id
    assert torch.all(top1.confidence[masked] == 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling,keep", [(dict(temperature=1.0), 6), (dict(temperature=0.5, top_k=4), 4),
                                           (dict(temperature=1.0, top_p=0.7), None)])
def test_sampled_distribution_is_the_filtered_softmax(device, sampling, keep):
    V = 6
    row = torch.tensor([1.0, 0.5, 0.0, -0.3, 0.9, -1.0])
    tokens = torch.full((64, 32), V - 1, device=device)
    logits = row.expand(64, 32, V).contiguous().to(device)
    counts = torch.zeros(V, dtype=torch.float64)
    for offset in range(4):
        out = commit_tokens(tokens, logits, mask_id=V - 1, threshold=1.0, min_commit=0, seed=77, offset=offset,
                            **sampling)
        counts += torch.bincount(out.candidates.flatten().cpu(), minlength=V).double()
    z = row / sampling["temperature"]
    if "top_k" in sampling:
        z = z.masked_fill(z < torch.topk(z, sampling["top_k"]).values[-1], float("-inf"))
    if "top_p" in sampling:
        probs = torch.softmax(z, 0)
        above = torch.stack([probs[z > z[i]].sum() for i in range(V)])
        z = z.masked_fill(above > sampling["top_p"], float("-inf"))
    expected = torch.softmax(z.double(), 0) * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token the filters remove"
    chi2 = (((counts - expected)[support]) ** 2 / expected[support]).sum().item()
    dof = int(support.sum()) - 1
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[dof]  # p = 0.001
    assert chi2 < critical, f"chi-square {chi2:.2f} >= {critical} with {dof} degrees of freedom"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [100, 40009])
def test_nan_raises(device, V):
    tokens, logits, mask_id = make_block(2, 8, V, device=device, seed=7)
    logits[1, 3, V - 17] = float("nan")
    tokens[1, 3] = mask_id
    with pytest.raises(ValueError, match="NaN"):
        commit_tokens(tokens, logits, mask_id=mask_id, threshold=0.5, min_commit=1)
    with pytest.raises(ValueError, match="NaN"):
        commit_tokens_(tokens, logits, mask_id=mask_id, threshold=0.5, min_commit=1)
    assert tokens[1, 3] == mask_id, "the NaN position was committed"
    with pytest.raises(ValueError, match="NaN"):
        commit_tokens_ref(tokens, logits, mask_id=mask_id, threshold=0.5, min_commit=1)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_logits_are_named(device):
    tokens, logits, mask_id = make_block(2, 8, 100, device=device, seed=7)
    kw = dict(mask_id=mask_id, threshold=0.5, min_commit=1)
    row_inf = logits.clone()
    row_inf[1, 3, 5] = float("inf")
    all_minus_inf = logits.clone()
    all_minus_inf[0, 2] = float("-inf")
    cases = [(row_inf, {}, r"logits\[1, 3\] has no finite maximum"), (all_minus_inf, {}, r"logits\[0, 2\] has no finite"),
             (logits, dict(temperature=1e-45, top_k=5), "temperature = 1e-45 is too small"),
             (logits, dict(temperature=torch.tensor([0.5, 1e-45], device=device)), r"temperature\[1\] = 1.4\d*e-45 is too")]
    for x, extra, match in cases:
        for fn in (commit_tokens, commit_tokens_, commit_tokens_ref):
            with pytest.raises(ValueError, match=match):
                fn(tokens.clone(), x, **kw, **extra)


def test_seeds_are_64_bit_words():
    tokens, logits, mask_id = make_block(2, 8, 100, device="cpu", seed=3)
    kw = dict(mask_id=mask_id, threshold=0.5, min_commit=1, temperature=1.0)
    for seed, same in ((2**64 - 1, -1), (2**63, -2**63)):
        result = commit_tokens(tokens, logits, seed=seed, offset=seed, **kw)
        assert_same(result, commit_tokens(tokens, logits, seed=same, offset=same, **kw))
        assert_same(result, commit_tokens_ref(tokens, logits, seed=seed, offset=seed, **kw))
        word = torch.tensor([same])                    # the same word as an int64 tensor (B = 1: row = l either way)
        one = commit_tokens(tokens[:1], logits[:1], seed=seed, offset=seed, **kw)
        assert_same(one, commit_tokens(tokens[:1], logits[:1], seed=word, offset=word, **kw))
        assert_same(one, commit_tokens_ref(tokens[:1], logits[:1], seed=word, offset=word, **kw))


def test_int64_min_commit_is_taken_as_is():
    tokens, logits, mask_id = make_block(2, 8, 100, device="cpu", seed=4)
    kw = dict(mask_id=mask_id, threshold=1.0)
    wide = torch.tensor([2**31 - 1, 3])
    assert_same(commit_tokens(tokens, logits, min_commit=wide, **kw), commit_tokens_ref(tokens, logits, min_commit=wide, **kw))
    assert commit_tokens(tokens, logits, min_commit=wide, **kw).committed[0].sum() == (tokens[0] == mask_id).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [100, 40009])
def test_negative_infinity_logits_are_fine(device, V):
    tokens, logits, mask_id = make_block(2, 8, V, device=device, seed=8)
    logits[:, :, :V * 3 // 5] = float("-inf")
    kw = dict(mask_id=mask_id, threshold=0.5, min_commit=1)
    assert_same(commit_tokens(tokens, logits, **kw), commit_tokens_ref(tokens, logits, **kw))


@pytest.mark.parametrize("change,match", [
    (dict(tokens=lambda t: t.int()), "tokens must be int64"),
    (dict(tokens=lambda t: t[0]), r"tokens must be \[B, L\]"),
    (dict(logits=lambda x: x.double()), "logits must be float32, bfloat16 or float16"),
    (dict(logits=lambda x: x[:, :, :50].transpose(0, 1).contiguous()), "does not match tokens shape"),
    (dict(logits=lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)), "logits must be contiguous"),
    (dict(mask_id=100), r"mask_id must be in \[0, V\)"),
    (dict(mask_id=-1), r"mask_id must be in \[0, V\)"),
    (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.2), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(temperature=-0.5), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(min_commit=-1), r"min_commit must be in \[0, 2\^31 - 1\], got -1"),
    (dict(min_commit=torch.ones(3, dtype=torch.int32)), r"min_commit must be an int or a tensor of shape \[B\]"),
    (dict(min_commit=1.5), "min_commit must be an int"),
    (dict(min_commit=2**32 + 1), r"min_commit must be in \[0, 2\^31 - 1\], got 4294967297"),
    (dict(min_commit=torch.tensor([1, 2**32 + 1])), r"min_commit\[1\] = 4294967297 is outside \[0, 2\^31 - 1\]"),
    (dict(min_commit=torch.ones(2, dtype=torch.int32, device="meta")), "min_commit is on meta but tokens is on cpu"),
    (dict(tokens=lambda t: t[0], min_commit=torch.ones(2, dtype=torch.int32)), r"tokens must be \[B, L\], got shape"),
    (dict(tokens=lambda t: t.tolist()), "tokens must be an int64 tensor"),
    (dict(temperature=1e-45), "temperature = 1e-45 is too small for these logits: logits / temperature overflows"),
    (dict(temperature=1e-46), "temperature = 1e-46 is too small for these logits"),
    (dict(temperature=1e39), r"temperature must be finite and >= 0 \(in float32\)"),
    (dict(seed=2**64), r"seed must be in \[-2\^63, 2\^64\) \(a 64-bit Philox word\), got 18446744073709551616"),
    (dict(seed=-2**63 - 1), r"seed must be in \[-2\^63, 2\^64\)"),
    (dict(offset=2**70), r"offset must be in \[-2\^63, 2\^64\)"),
    (dict(seed=1.5), r"seed must be an int or a tensor \[B\], got float"),
    (dict(seed=torch.tensor([1.0, 2.0])), "seed must be an int or an integer tensor"),
    (dict(temperature=torch.tensor([0.5, 1e-46], dtype=torch.float64)), r"temperature\[1\] = 1e-46 is too small"),
    (dict(logits=lambda x: x.to("meta")), "logits is on meta but tokens is on cpu"),
])
def test_bad_arguments_are_named(change, match):
    tokens, logits, mask_id = make_block(2, 8, 100, device="cpu", seed=9)
    kw = dict(tokens=tokens, logits=logits, mask_id=mask_id, threshold=0.5, min_commit=1)
    for key, value in change.items():
        kw[key] = value(kw[key]) if callable(value) else value
    with pytest.raises((ValueError, TypeError), match=match):
        commit_tokens(kw.pop("tokens"), kw.pop("logits"), **kw)


def opcheck_samples(device):
    """(args, kwargs) samples for torch.library.opcheck of llada::commit_tokens(_) and
    llada::commit_tokens_per_seq(_)."""
    tokens, logits, mask_id = make_block(3, 8, 64, device=device, seed=10)
    min_commit = torch.tensor([1, 0, 3], dtype=torch.int32, device=device)
    kw = dict(mask_id=mask_id, threshold=0.5, temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0)
    sampled = dict(kw, temperature=0.9, top_k=10, top_p=0.9, seed=5, offset=1)
    samples = [((tokens, logits, min_commit), kw), ((tokens, logits.bfloat16(), min_commit), sampled)]
    per_seq = (torch.tensor([0.5, 0.9, 0.0]), torch.tensor([0.0, 0.8, 1.5]), torch.tensor([0, 5, 0], dtype=torch.int32),
               torch.tensor([1.0, 1.0, 0.7]), torch.tensor([3, 4, 5]), torch.tensor([0, 2, 1]))
    on_device = tuple(t.to(device) for t in per_seq)
    per_seq_samples = [((tokens, logits, min_commit) + on_device, dict(mask_id=mask_id)),
                       ((tokens, logits.bfloat16(), min_commit) + per_seq, dict(mask_id=mask_id, own_streams=False))]
    return {"commit_tokens": samples,
            "commit_tokens_": [((a[0].clone(),) + a[1:], k) for a, k in samples],
            "commit_tokens_per_seq": per_seq_samples,
            "commit_tokens_per_seq_": [((a[0].clone(),) + a[1:], k) for a, k in per_seq_samples]}
