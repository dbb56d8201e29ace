"""Non-finite inputs in block attention (forward, backward, decode form) propagate as in the reference,
softmax and logsumexp over the kept scores (see llada_engine/ops/block_attention.py): NaN or inf in q or k
gives the reference's out and lse exactly (NaN, +inf, or a row that sees no key: out 0, lse -inf); NaN or inf
in v is NaN in the out of every query weighing it and never where the reference is finite; gradients are
never NaN where the reference's are finite, are NaN for the rows and keys a NaN reaches through a kept score,
and other documents never see it. Documents of 5, 71 (two key tiles, one skipped by some query tiles) and 9
tokens, and one with more queries than keys (its first queries see no key)."""
import pytest
import torch

from llada_engine.ops import (block_attention, block_attention_decode, block_attention_decode_ref,
                              block_attention_ref)

pytestmark = pytest.mark.kernels

NAN, INF = float("nan"), float("inf")
LENGTHS_Q, LENGTHS_K = [5, 71, 9, 12], [5, 71, 9, 4]
MASKED_ROW = 76 + 9 + 2     # a query of the last document that sees no key (block_causal, block size 4)


def packed(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENGTHS_Q), sum(LENGTHS_K)
    q, k, v = torch.randn(tq, 4, 16, generator=g), torch.randn(tk, 2, 16, generator=g), torch.randn(tk, 2, 16, generator=g)
    cu = [torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).int() for lengths in (LENGTHS_Q, LENGTHS_K)]
    return [t.to(dtype) for t in (q, k, v)], cu


# (tensor, row, head, dim, value): rows of the second document (5 .. 75) unless said otherwise
INJECTIONS = {
    "nan q element": [("q", 20, 1, 3, NAN)],
    "nan q row": [("q", 40, 2, d, NAN) for d in range(16)],
    "inf q element": [("q", 30, 0, 5, INF)],
    "-inf q element": [("q", 30, 0, 5, -INF)],
    "nan k element": [("k", 30, 0, 2, NAN)],
    "inf k element": [("k", 30, 0, 2, INF)],
    "-inf k element": [("k", 12, 1, 0, -INF)],
    "nan and inf k": [("k", 30, 0, 2, NAN), ("k", 31, 0, 2, INF)],
    "nan q of a query that sees no key": [("q", MASKED_ROW, 1, 4, NAN)],
    "nan v element": [("v", 30, 0, 2, NAN)],
    "inf v element": [("v", 60, 1, 7, INF)],
    "nan v of a document with a query that sees no key": [("v", 87, 1, 2, NAN)],
}
IN_V = {"nan v element", "inf v element", "nan v of a document with a query that sees no key"}


def inject(tensors, name):
    q, k, v = (t.clone() for t in tensors)
    by_name = dict(q=q, k=k, v=v)
    for tensor, row, head, dim, value in INJECTIONS[name]:
        by_name[tensor][row, head, dim] = value
    return q, k, v


def assert_same_non_finite(got, want, name):
    """The same NaN and +-inf positions, the finite values close."""
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at other positions than the reference"
    assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)), f"{name}: +inf elsewhere"
    assert torch.equal(got.isinf() & (got < 0), want.isinf() & (want < 0)), f"{name}: -inf elsewhere"
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], want[finite], atol=2e-5, rtol=1e-5, msg=name)


def assert_nan_within_reference(got, want, name):
    """NaN only where the reference has NaN; everywhere else within 2e-5 of it (infinities equal)."""
    extra = got.isnan() & ~want.isnan()
    assert not extra.any(), f"{name}: NaN where the reference is finite, at {extra.nonzero()[:4].tolist()}"
    both = ~got.isnan() & ~want.isnan()
    torch.testing.assert_close(got[both], want[both], atol=2e-5, rtol=1e-5, msg=name)


def assert_weighing_rows_non_finite(fn, got, tensors, cu, name):
    """Every (query, head, dim) of out that weighs the poisoned value is NaN (inf: NaN or inf): those whose
    reference out changes when the value is 0 or 1 instead."""
    (tensor, row, head, dim, value), = INJECTIONS[name]
    outs = []
    for finite in (0.0, 1.0):
        q, k, v = (t.clone() for t in tensors)
        v[row, head, dim] = finite
        outs.append(attention(fn, q, k, v, cu, "block_causal", output_grads(1))[0])
    weighing = outs[0] != outs[1]
    assert weighing.any(), f"{name}: no query weighs the value"
    hit = got[weighing]
    assert (hit.isnan() if value != value else ~hit.isfinite()).all(), f"{name}: swallowed by a query weighing it"


def rows_with_nan(t):
    return set(t.reshape(t.shape[0], -1).isnan().any(1).nonzero().flatten().tolist())


def attention(fn, q, k, v, cu, mask, grads):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kw = dict(block_size=4, mask=mask, return_lse=True)
    longest = [int((c[1:] - c[:-1]).max()) for c in cu]
    out, lse = fn(q, k, v, cu[0], cu[1], *longest, **kw)
    torch.autograd.backward([out, lse], grads(out, lse))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def output_grads(seed):
    def make(out, lse):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(out.shape, generator=g).to(out.dtype), torch.randn(lse.shape, generator=g)]
    return make


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_forward_and_backward_propagate_as_the_reference(name):
    tensors, cu = packed()
    q, k, v = inject(tensors, name)
    got = attention(block_attention, q, k, v, cu, "block_causal", output_grads(1))
    want = attention(block_attention_ref, q, k, v, cu, "block_causal", output_grads(1))
    (out, lse, dq, dk, dv), (ref_out, ref_lse, *ref_grads) = got, want
    assert_same_non_finite(lse, ref_lse, f"{name}: lse")
    if name in IN_V:
        assert_nan_within_reference(out, ref_out, f"{name}: out")
        assert_weighing_rows_non_finite(block_attention_ref, out, tensors, cu, name)
    else:
        assert_same_non_finite(out, ref_out, f"{name}: out")
    row = INJECTIONS[name][0][1]
    doc = [(int(c[s]), int(c[s + 1])) for c in cu for s in range(len(c) - 1) if c[s] <= row < c[s + 1]]
    inside = set(range(*doc[0])) | set(range(*doc[1]))  # its queries and its keys
    for grad, ref_grad, label in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
        assert_nan_within_reference(grad, ref_grad, f"{name}: {label}")
        assert rows_with_nan(grad) <= inside, f"{name}: {label} NaN outside the document"


def test_the_rule_on_the_named_cases():
    tensors, cu = packed()
    kw = dict(block_size=4, mask="block_causal", return_lse=True)
    run = lambda q, k, v: block_attention(q, k, v, cu[0], cu[1], 71, 71, **kw)  # noqa: E731
    out, lse = run(*tensors)
    assert (out[MASKED_ROW] == 0).all() and (lse[MASKED_ROW] == -INF).all(), "a query that sees no key"
    out, lse = run(*inject(tensors, "nan q element"))
    assert out[20, 1].isnan().all() and lse[20, 1].isnan(), "NaN in a query: out and lse NaN"
    assert out[20, 0].isfinite().all() and out[19].isfinite().all(), "other heads and queries untouched"
    out, lse = run(*inject(tensors, "nan q of a query that sees no key"))
    assert (out[MASKED_ROW] == 0).all() and (lse[MASKED_ROW] == -INF).all(), "it still sees no key"
    out, lse = run(*inject(tensors, "nan v of a document with a query that sees no key"))
    assert (out[MASKED_ROW] == 0).all() and (lse[MASKED_ROW] == -INF).all(), "0, never 0 * NaN"
    assert out[93:97, 2:, 2].isnan().all(), "the queries that see the key (its last 4) weigh it"
    out, lse = run(*inject(tensors, "nan k element"))  # key 25 of the document: its block is 6
    seeing = [r for r in range(5, 76) if (r - 5) // 4 >= (30 - 5) // 4]
    assert lse[seeing, :2].isnan().all() and lse[[r for r in range(5, 76) if r not in seeing]].isfinite().all()
    q, k, v = (t.clone() for t in tensors)
    k[5:76, 0, 0] = k[5:76, 0, 0].abs() + 0.1
    q[40, 1, 0] = -INF  # every score of the row -inf: it sees no key
    q[41, 1, 0] = INF   # a +inf score
    out, lse = run(q, k, v)
    assert (out[40, 1] == 0).all() and lse[40, 1] == -INF
    assert out[41, 1].isnan().all() and lse[41, 1] == INF


@pytest.mark.parametrize("name", ["nan q element", "inf k element", "nan k element", "nan v element"])
def test_bf16_forward_propagates_as_the_reference(name):
    tensors, cu = packed(torch.bfloat16, seed=2)
    q, k, v = inject(tensors, name)
    kw = dict(block_size=4, mask="block_causal", return_lse=True)
    out, lse = block_attention(q, k, v, cu[0], cu[1], 71, 71, **kw)
    ref_out, ref_lse = block_attention_ref(q.float(), k.float(), v.float(), cu[0], cu[1], 71, 71, **kw)
    assert torch.equal(lse.isnan(), ref_lse.isnan()) and torch.equal(lse.isinf(), ref_lse.isinf())
    if name in IN_V:
        assert not (out.isnan() & ~ref_out.isnan()).any()
    else:
        assert torch.equal(out.isnan(), ref_out.isnan())


@pytest.mark.parametrize("name", ["nan q element", "nan k element", "inf k element", "nan v element"])
def test_bd3_forward_and_backward_propagate_as_the_reference(name):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(154, 2, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0, 6, 146, 154], dtype=torch.int32)  # [x_t | x_0] documents of 3 + 3, 70 + 70, 4 + 4
    tensor, row, head, dim, value = INJECTIONS[name][0]
    dict(q=q, k=k, v=v)[tensor][row + 60, head % 2, dim] = value
    got, want = (attention(fn, q, k, v, (cu, cu), "bd3", output_grads(4)) for fn in (block_attention,
                                                                                       block_attention_ref))
    assert_same_non_finite(got[1], want[1], f"{name}: lse")
    for label, g_, w_ in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert_nan_within_reference(g_, w_, f"{name}: {label}")
        assert rows_with_nan(g_) <= set(range(6, 146)), f"{name}: {label} NaN outside the document"


def decode_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    B, Lb, S = 3, 5, 70
    return dict(q=torch.randn(B, Lb, 4, 16, generator=g), k_cache=torch.randn(B, S, 2, 16, generator=g),
                v_cache=torch.randn(B, S, 2, 16, generator=g), cache_seqlens=torch.tensor([66, 0, 9], dtype=torch.int32),
                k_new=torch.randn(B, Lb, 2, 16, generator=g), v_new=torch.randn(B, Lb, 2, 16, generator=g))


DECODE_INJECTIONS = {  # tensor, index, value
    "nan q": ("q", (0, 2, 1, 3), NAN),
    "inf q": ("q", (2, 0, 3, 0), INF),
    "nan cached k": ("k_cache", (0, 40, 0, 1), NAN),
    "inf cached k": ("k_cache", (2, 3, 1, 9), INF),
    "nan new k": ("k_new", (1, 4, 1, 2), NAN),
    "nan k past the cache length": ("k_cache", (1, 3, 0, 0), NAN),
    "inf v past the cache length": ("v_cache", (2, 50, 0, 0), INF),
    "nan cached v": ("v_cache", (0, 10, 1, 1), NAN),
}


@pytest.mark.parametrize("name", sorted(DECODE_INJECTIONS))
def test_decode_form_propagates_as_the_reference(name):
    args = decode_inputs()
    tensor, index, value = DECODE_INJECTIONS[name]
    args[tensor][index] = value
    out, lse = block_attention_decode(**args, return_lse=True)
    ref_out, ref_lse = block_attention_decode_ref(**args, return_lse=True)
    assert_same_non_finite(lse, ref_lse, f"{name}: lse")
    if tensor.startswith("v"):
        assert_nan_within_reference(out, ref_out, f"{name}: out")
    else:
        assert_same_non_finite(out, ref_out, f"{name}: out")
    if "past the cache length" in name:
        assert out.isfinite().all() and lse.isfinite().all()
    if name == "nan cached k":
        assert lse[0, :, :2].isnan().all() and lse[1:].isfinite().all()
