"""One small valid call of every `torch.ops.llada` op and of every public op wrapper, with its reference:
the tests of devices, of index tensors' strides and the fuzz test share them.

A case is a fresh set of random arguments by name (`args`: positional, in order; `kwargs`: keyword-only),
the op, and a reference called the same way that returns what the op must return. `index` names the
arguments whose values the binding or kernel reads as indices, each with values that are invalid.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from llada_engine import ops
from llada_engine.ops.commit_tokens import commit_tokens_per_seq_ref


def _llada(name: str) -> Callable[..., Any]:
    """torch.ops.llada.<name>, looked up when called (so that this module imports where the extension is not
    built: the suite then collects and skips the tests that need it)."""
    def call(*args, **kwargs):
        return getattr(torch.ops.llada, name)(*args, **kwargs)
    return call


@dataclass
class OpCase:
    name: str
    op: Callable[..., Any]
    args: dict[str, Any]
    kwargs: dict[str, Any]
    ref: Optional[Callable[..., Any]]
    index: dict[str, torch.Tensor] = field(default_factory=dict)  # index argument -> invalid values
    # Arguments whose NaN the op may confine to fewer outputs than the reference does (where the reference's
    # dense products spread it as 0 * NaN; docs in llada_engine/ops/block_attention.py): with a NaN there,
    # the op's result may be NaN only where the reference's is.
    nan_within_reference: frozenset = frozenset()
    # Arguments that are results of other arguments (the forward's out and lse that the backward takes):
    # derive(arguments by name) recomputes them, so that a fuzzed call stays the backward of a forward.
    derive: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None

    def call(self, fn=None, **changes):
        """fn (default: the op) on the case's arguments, with `changes` replacing arguments by name."""
        args = {k: changes.get(k, v) for k, v in self.args.items()}
        kwargs = {k: changes.get(k, v) for k, v in self.kwargs.items()}
        return (fn or self.op)(*args.values(), **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in {**self.args, **self.kwargs}.items() if isinstance(v, torch.Tensor)}


def assert_same_result(result, expected, *, name: str = "result", nan_within_reference: bool = False,
                       atol_of_largest: bool = False) -> None:
    """Tensors (nested in tuples) equal: floating ones to 1e-5 with NaN where the reference has NaN (or, with
    nan_within_reference, NaN only where the reference has NaN), others exactly. With atol_of_largest, the
    absolute tolerance is 1e-5 of the largest finite value of the reference (at least 1): fp32 rounding of
    terms that large (extreme inputs) is then what both sides may differ by."""
    if isinstance(result, torch.Tensor):
        assert isinstance(expected, torch.Tensor), f"{name}: a tensor where the reference gives {type(expected)}"
        assert result.shape == expected.shape, f"{name}: shape {list(result.shape)} != {list(expected.shape)}"
        assert result.dtype == expected.dtype, f"{name}: dtype {result.dtype} != {expected.dtype}"
        if not result.is_floating_point():
            assert torch.equal(result, expected), f"{name}: {result} != {expected}"
            return
        atol = 1e-5
        finite = expected[expected.isfinite()]
        if atol_of_largest and finite.numel():
            atol *= max(1.0, finite.abs().max().item())
        if nan_within_reference:
            assert not (result.isnan() & ~expected.isnan()).any(), f"{name}: NaN where the reference has none"
            both = ~result.isnan() & ~expected.isnan()
            torch.testing.assert_close(result[both], expected[both], rtol=1e-5, atol=atol, msg=name)
        else:
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=atol, equal_nan=True, msg=name)
        return
    assert isinstance(expected, (tuple, list)), f"{name}: {len(result)} outputs where the reference gives a tensor"
    assert len(result) == len(expected), f"{name}: {len(result)} outputs, the reference {len(expected)}"
    for i, (r, e) in enumerate(zip(result, expected)):
        assert_same_result(r, e, name=f"{name}[{i}]", nan_within_reference=nan_within_reference,
                           atol_of_largest=atol_of_largest)


def _grad_ref(fn, inputs, grads):
    """The gradients of fn(*inputs) (one output or a tuple) for the output gradients `grads`."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)


# ---- commit_tokens ----------------------------------------------------------------------------------

def _commit_inputs(g):
    tokens = torch.randint(0, 7, (2, 6), generator=g)
    tokens[:, ::2] = 3                                                    # masked positions (mask_id 3)
    logits = torch.randn(2, 6, 7, generator=g) * 2
    return tokens, logits, torch.tensor([1, 2], dtype=torch.int32)


COMMIT_KW = dict(mask_id=3, threshold=0.6, temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0)


def _commit_ref(tokens, logits, min_commit, **kw):
    """The reference of the ops with scalar parameters, which return no `invalid` (they raise instead)."""
    return tuple(ops.commit_tokens_ref(tokens, logits, min_commit=min_commit, **kw))[:4]


def commit_tokens_op(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("llada.commit_tokens", _llada("commit_tokens"),
                  dict(tokens=tokens, logits=logits, min_commit=min_commit), dict(COMMIT_KW), _commit_ref,
                  index=dict(min_commit=torch.tensor([1, -1], dtype=torch.int32)))


def _commit_inplace(tokens, logits, min_commit, **kw):
    return (tokens, *torch.ops.llada.commit_tokens_(tokens, logits, min_commit, **kw))


def commit_tokens_inplace_op(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("llada.commit_tokens_", _commit_inplace, dict(tokens=tokens, logits=logits, min_commit=min_commit),
                  dict(COMMIT_KW), _commit_ref, index=dict(min_commit=torch.tensor([1, -1], dtype=torch.int32)))


def _commit_public(fn):
    def call(tokens, logits, **kw):
        return tuple(fn(tokens, logits, **kw))
    return call


def commit_tokens_public(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("commit_tokens", _commit_public(ops.commit_tokens), dict(tokens=tokens, logits=logits),
                  dict(COMMIT_KW, min_commit=min_commit), _commit_public(ops.commit_tokens_ref),
                  index=dict(min_commit=torch.tensor([1, -1], dtype=torch.int32)))


def commit_tokens_inplace_public(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("commit_tokens_", _commit_public(ops.commit_tokens_), dict(tokens=tokens, logits=logits),
                  dict(COMMIT_KW, min_commit=min_commit), _commit_public(ops.commit_tokens_ref),
                  index=dict(min_commit=torch.tensor([1, -1], dtype=torch.int32)))


def _per_seq_params(g):
    """The six [B] parameter tensors of commit_tokens_per_seq for B = 2: a greedy and a sampled sequence."""
    return dict(threshold=torch.tensor([0.6, 0.3]), temperature=torch.tensor([0.0, 0.9]),
                top_k=torch.tensor([0, 4], dtype=torch.int32), top_p=torch.tensor([1.0, 0.8]),
                seed=torch.randint(-2**63, 2**63 - 1, (2,), generator=g, dtype=torch.int64),
                offset=torch.tensor([0, 2**63 - 1]))


def _commit_per_seq_ref(tokens, logits, min_commit, *params, **kw):
    return tuple(commit_tokens_per_seq_ref(tokens, logits, min_commit, *params, **kw))


PER_SEQ_INDEX = dict(min_commit=torch.tensor([1, -1], dtype=torch.int32),
                     top_k=torch.tensor([0, -2], dtype=torch.int32))


def commit_tokens_per_seq_op(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("llada.commit_tokens_per_seq", _llada("commit_tokens_per_seq"),
                  dict(tokens=tokens, logits=logits, min_commit=min_commit, **_per_seq_params(g)),
                  dict(mask_id=3, own_streams=True), _commit_per_seq_ref, index=dict(PER_SEQ_INDEX))


def _commit_per_seq_inplace(tokens, logits, min_commit, *params, **kw):
    return (tokens, *torch.ops.llada.commit_tokens_per_seq_(tokens, logits, min_commit, *params, **kw))


def commit_tokens_per_seq_inplace_op(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("llada.commit_tokens_per_seq_", _commit_per_seq_inplace,
                  dict(tokens=tokens, logits=logits, min_commit=min_commit, **_per_seq_params(g)),
                  dict(mask_id=3, own_streams=False), _commit_per_seq_ref, index=dict(PER_SEQ_INDEX))


def commit_tokens_per_seq_public(g):
    tokens, logits, min_commit = _commit_inputs(g)
    return OpCase("commit_tokens.per_seq", _commit_public(ops.commit_tokens), dict(tokens=tokens, logits=logits),
                  dict(mask_id=3, min_commit=min_commit, **_per_seq_params(g)), _commit_public(ops.commit_tokens_ref),
                  index=dict(PER_SEQ_INDEX))


# ---- MoE --------------------------------------------------------------------------------------------

ROUTE_KW = dict(top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)


def moe_route_case(name, op):
    def make(g):
        return OpCase(name, op, dict(router_logits=torch.randn(5, 8, generator=g),
                                     expert_bias=torch.randn(8, generator=g) * 0.3),
                      dict(ROUTE_KW), ops.moe_route_ref)
    return make


def moe_permute_case(name, op):
    def make(g):
        return OpCase(name, op, dict(x=torch.randn(5, 6, generator=g),
                                     topk_ids=torch.randint(0, 4, (5, 2), generator=g, dtype=torch.int32),
                                     num_experts=4), {}, ops.moe_permute_ref,
                      index=dict(topk_ids=torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1], [0, 2]], dtype=torch.int32)))
    return make


def _inverse(g, n):
    return torch.randperm(n, generator=g).int()


def _bad_inverse(n):
    bad = torch.arange(n, dtype=torch.int32)
    bad[n // 2] = n
    return bad


def moe_unpermute_case(name, op):
    def make(g):
        return OpCase(name, op, dict(y=torch.randn(10, 6, generator=g), inverse=_inverse(g, 10),
                                     topk_weights=torch.rand(5, 2, generator=g)), {}, ops.moe_unpermute_ref,
                      index=dict(inverse=_bad_inverse(10)))
    return make


def _unpermute_backward_ref(grad_out, y, inverse, topk_weights):
    return _grad_ref(lambda y_, w_: ops.moe_unpermute_ref(y_, inverse, w_), (y, topk_weights), (grad_out,))


def moe_unpermute_backward_op(g):
    return OpCase("llada.moe_unpermute_backward", _llada("moe_unpermute_backward"),
                  dict(grad_out=torch.randn(5, 6, generator=g), y=torch.randn(10, 6, generator=g),
                       inverse=_inverse(g, 10), topk_weights=torch.rand(5, 2, generator=g)), {},
                  _unpermute_backward_ref, index=dict(inverse=_bad_inverse(10)))


OFFSETS = [0, 2, 2, 7]          # 3 groups (one empty) over 7 rows
BAD_OFFSETS = [0, 5, 2, 7]      # not non-decreasing


def moe_grouped_gemm_case(name, op):
    def make(g):
        return OpCase(name, op, dict(a=torch.randn(7, 6, generator=g), b=torch.randn(3, 5, 6, generator=g),
                                     offsets=torch.tensor(OFFSETS, dtype=torch.int32)), {}, ops.moe_grouped_gemm_ref,
                      index=dict(offsets=torch.tensor(BAD_OFFSETS, dtype=torch.int32)))
    return make


def _wgrad_ref(grad_out, a, offsets):
    o = offsets.tolist()
    return torch.stack([grad_out[o[e]:o[e + 1]].t() @ a[o[e]:o[e + 1]] for e in range(len(o) - 1)])


def moe_grouped_gemm_wgrad_op(g):
    return OpCase("llada.moe_grouped_gemm_wgrad", _llada("moe_grouped_gemm_wgrad"),
                  dict(grad_out=torch.randn(7, 5, generator=g), a=torch.randn(7, 6, generator=g),
                       offsets=torch.tensor(OFFSETS, dtype=torch.int32)), {}, _wgrad_ref,
                  index=dict(offsets=torch.tensor(BAD_OFFSETS, dtype=torch.int32)))


def moe_experts_public(g):
    return OpCase("moe_experts", ops.moe_experts,
                  dict(x=torch.randn(5, 6, generator=g),
                       topk_ids=torch.randint(0, 3, (5, 2), generator=g, dtype=torch.int32),
                       topk_weights=torch.rand(5, 2, generator=g), w13=torch.randn(3, 8, 6, generator=g) * 0.3,
                       w2=torch.randn(3, 6, 4, generator=g) * 0.3), {}, ops.moe_experts_ref,
                  index=dict(topk_ids=torch.tensor([[0, 1], [2, 3], [1, 0], [1, 1], [0, 2]], dtype=torch.int32)))


# ---- block attention --------------------------------------------------------------------------------

CU = [0, 3, 10]                 # documents of 3 and 7 tokens
ATTN_KW = dict(block_size=2, mask="block_causal", softmax_scale=0.35)


def _attention_inputs(g):
    q = torch.randn(10, 2, 8, generator=g)
    k, v = torch.randn(10, 1, 8, generator=g), torch.randn(10, 1, 8, generator=g)
    cu = torch.tensor(CU, dtype=torch.int32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=7, max_seqlen_k=7)


def _bad_cu():
    return torch.tensor([0, 7, 3], dtype=torch.int32)


def _attention_ref(*args, **kw):
    kw.pop("kernel", None)
    return ops.block_attention_ref(*args, return_lse=True, **kw)


def block_attention_fwd_op(g):
    return OpCase("llada.block_attention_fwd", _llada("block_attention_fwd"), _attention_inputs(g),
                  dict(ATTN_KW, kernel="auto"), _attention_ref,
                  index=dict(cu_seqlens_q=_bad_cu(), cu_seqlens_k=_bad_cu()), nan_within_reference=frozenset({"v"}))


def _attention_public_ref(*args, return_lse, kernel=None, **kw):
    return ops.block_attention_ref(*args, return_lse=return_lse, **kw)


def block_attention_public(g):
    return OpCase("block_attention", ops.block_attention, _attention_inputs(g), dict(ATTN_KW, return_lse=True),
                  _attention_public_ref, index=dict(cu_seqlens_q=_bad_cu(), cu_seqlens_k=_bad_cu()),
                  nan_within_reference=frozenset({"v"}))


def _attention_bwd_ref(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, **kw):
    return _grad_ref(lambda q_, k_, v_: _attention_ref(q_, k_, v_, cu_q, cu_k, max_q, max_k, **kw), (q, k, v),
                     (dout, dlse))


def _attention_bwd_derive(a):
    """out and lse of the forward kernel, as autograd gives them to the backward."""
    return dict(zip(("out", "lse"), torch.ops.llada.block_attention_fwd(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
        block_size=a["block_size"], mask=a["mask"], softmax_scale=a["softmax_scale"], kernel=a["kernel"])))


def block_attention_bwd_op(g):
    inputs = _attention_inputs(g)
    out, lse = _attention_ref(*inputs.values(), **ATTN_KW)
    q = inputs.pop("q")
    args = dict(dout=torch.randn(out.shape, generator=g), q=q, k=inputs.pop("k"), v=inputs.pop("v"), out=out,
                lse=lse, dlse=torch.randn(lse.shape, generator=g), **inputs)
    return OpCase("llada.block_attention_bwd", _llada("block_attention_bwd"), args,
                  dict(ATTN_KW, kernel="auto"), _attention_bwd_ref,
                  index=dict(cu_seqlens_q=_bad_cu(), cu_seqlens_k=_bad_cu()),
                  nan_within_reference=frozenset({"dout", "q", "k", "v", "out", "lse", "dlse"}),
                  derive=_attention_bwd_derive)


def _decode_inputs(g):
    return dict(q=torch.randn(2, 3, 2, 8, generator=g), k_cache=torch.randn(2, 5, 1, 8, generator=g),
                v_cache=torch.randn(2, 5, 1, 8, generator=g), cache_seqlens=torch.tensor([2, 5], dtype=torch.int32),
                k_new=torch.randn(2, 3, 1, 8, generator=g), v_new=torch.randn(2, 3, 1, 8, generator=g))


def block_attention_decode_op(g):
    return OpCase("llada.block_attention_decode", _llada("block_attention_decode"), _decode_inputs(g),
                  dict(softmax_scale=0.35), lambda *a, **kw: ops.block_attention_decode_ref(*a, return_lse=True, **kw),
                  index=dict(cache_seqlens=torch.tensor([2, 6], dtype=torch.int32)),
                  nan_within_reference=frozenset({"v_cache", "v_new"}))


PAGE = 8  # rows per page of the paged cases


def _paged_inputs(g):
    """The decode inputs with a paged cache: 4 pages of 8 rows, sequence 0 on pages [2, -] (5 rows; its second
    entry is never read), sequence 1 on pages [0, 3] (11 rows); page 1 is owned by no one."""
    return dict(q=torch.randn(2, 3, 2, 8, generator=g), k_cache=torch.randn(4, PAGE, 1, 8, generator=g),
                v_cache=torch.randn(4, PAGE, 1, 8, generator=g), cache_seqlens=torch.tensor([5, 11], dtype=torch.int32),
                k_new=torch.randn(2, 3, 1, 8, generator=g), v_new=torch.randn(2, 3, 1, 8, generator=g),
                block_table=torch.tensor([[2, -1], [0, 3]], dtype=torch.int32))


PAGED_INDEX = dict(cache_seqlens=torch.tensor([5, 17], dtype=torch.int32),
                   block_table=torch.tensor([[2, -1], [0, 4]], dtype=torch.int32))


def _paged_op(*args, block_table, **kw):
    return torch.ops.llada.block_attention_decode(*args, block_table=block_table, **kw)


def block_attention_decode_paged_op(g):
    inputs = _paged_inputs(g)
    block_table = inputs.pop("block_table")
    return OpCase("llada.block_attention_decode.paged", _paged_op, inputs,
                  dict(softmax_scale=0.35, block_table=block_table),
                  lambda *a, **kw: ops.block_attention_decode_ref(*a, return_lse=True, **kw),
                  index=dict(PAGED_INDEX), nan_within_reference=frozenset({"v_cache", "v_new"}))


def block_attention_decode_paged_public(g):
    inputs = _paged_inputs(g)
    block_table = inputs.pop("block_table")
    return OpCase("block_attention_decode.paged", ops.block_attention_decode, inputs,
                  dict(softmax_scale=0.35, return_lse=True, block_table=block_table), ops.block_attention_decode_ref,
                  index=dict(PAGED_INDEX), nan_within_reference=frozenset({"v_cache", "v_new"}))


def block_attention_decode_public(g):
    return OpCase("block_attention_decode", ops.block_attention_decode, _decode_inputs(g),
                  dict(softmax_scale=0.35, return_lse=True), ops.block_attention_decode_ref,
                  index=dict(cache_seqlens=torch.tensor([2, 6], dtype=torch.int32)),
                  nan_within_reference=frozenset({"v_cache", "v_new"}))


CASES: dict[str, Callable[[torch.Generator], OpCase]] = {
    "llada.commit_tokens": commit_tokens_op,
    "llada.commit_tokens_": commit_tokens_inplace_op,
    "llada.moe_route": moe_route_case("llada.moe_route", _llada("moe_route")),
    "llada.moe_permute": moe_permute_case("llada.moe_permute", _llada("moe_permute")),
    "llada.moe_unpermute": moe_unpermute_case("llada.moe_unpermute", _llada("moe_unpermute")),
    "llada.moe_unpermute_backward": moe_unpermute_backward_op,
    "llada.moe_grouped_gemm": moe_grouped_gemm_case("llada.moe_grouped_gemm", _llada("moe_grouped_gemm")),
    "llada.moe_grouped_gemm_wgrad": moe_grouped_gemm_wgrad_op,
    "llada.block_attention_fwd": block_attention_fwd_op,
    "llada.block_attention_bwd": block_attention_bwd_op,
    "llada.block_attention_decode": block_attention_decode_op,
    "llada.block_attention_decode.paged": block_attention_decode_paged_op,
    "llada.commit_tokens_per_seq": commit_tokens_per_seq_op,
    "llada.commit_tokens_per_seq_": commit_tokens_per_seq_inplace_op,
    "commit_tokens": commit_tokens_public,
    "commit_tokens_": commit_tokens_inplace_public,
    "moe_route": moe_route_case("moe_route", ops.moe_route),
    "moe_permute": moe_permute_case("moe_permute", ops.moe_permute),
    "moe_unpermute": moe_unpermute_case("moe_unpermute", ops.moe_unpermute),
    "moe_grouped_gemm": moe_grouped_gemm_case("moe_grouped_gemm", ops.moe_grouped_gemm),
    "moe_experts": moe_experts_public,
    "block_attention": block_attention_public,
    "block_attention_decode": block_attention_decode_public,
    "block_attention_decode.paged": block_attention_decode_paged_public,
    "commit_tokens.per_seq": commit_tokens_per_seq_public,
}


def make_case(name: str, seed: int = 0) -> OpCase:
    return CASES[name](torch.Generator().manual_seed(seed))
