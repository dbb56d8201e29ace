"""Index tensors (offsets, topk_ids, inverse, cu_seqlens, cache_seqlens, min_commit) are read through their
strides: a view gives what its contiguous copy gives (the same result, or the same error quoting the same
values), never a value of the memory around it; an op that needs contiguous indices says so by name. Valid
and invalid values, viewed with a step, at a storage offset, transposed and expanded, for every op that reads
them."""
import pytest
import torch

from llada_engine.ops import moe_grouped_gemm, moe_grouped_gemm_ref
from op_cases import CASES, assert_same_result, make_case

pytestmark = pytest.mark.kernels

JUNK = 2**30 + 7  # what the memory around a view holds

INDEX_ARGS = sorted((case, arg) for case in CASES for arg in make_case(case).index)


def views(t: torch.Tensor):
    """(name, view) pairs showing the values of t from storage that holds JUNK wherever the view does not look."""
    stepped = torch.full((t.shape[0] * 3, *t.shape[1:]), JUNK, dtype=t.dtype)
    stepped[::3] = t
    yield "stepped", stepped[::3]
    shifted = torch.full((t.numel() + 5,), JUNK, dtype=t.dtype)
    shifted[5:] = t.reshape(-1)
    yield "offset", shifted[5:].view(t.shape)
    if t.dim() == 2:
        yield "transposed", t.t().contiguous().t()
        wide = torch.full((t.shape[0], t.shape[1] * 2), JUNK, dtype=t.dtype)
        wide[:, ::2] = t
        yield "column-stepped", wide[:, ::2]
    if (t == t.reshape(-1)[0]).all():
        yield "expanded", t.reshape(-1)[:1].expand(t.shape) if t.dim() == 1 else t[:1].expand(t.shape)


def outcome(case, **changes):
    try:
        return "ok", case.call(**changes)
    except (ValueError, TypeError, RuntimeError) as error:
        return "error", f"{type(error).__name__}: {str(error).splitlines()[0]}"


def assert_same_outcome(case_name, arg, view):
    """(Each call on a fresh case: the in-place ops change their tokens.)"""
    got = outcome(make_case(case_name), **{arg: view})
    want = outcome(make_case(case_name), **{arg: view.contiguous()})
    if got[0] == "error" and f"{arg} must be contiguous" in got[1]:
        return
    assert got[0] == want[0], f"{case_name}: {arg} as a view gives {got}, its contiguous copy {want}"
    if got[0] == "ok":
        assert_same_result(got[1], want[1], name=f"{case_name} with a viewed {arg}")
    else:
        assert got[1] == want[1]


@pytest.mark.parametrize("case_name,arg", INDEX_ARGS)
@pytest.mark.parametrize("values", ["valid", "invalid"])
def test_index_views_read_what_they_show(case_name, arg, values):
    template = make_case(case_name)
    t = template.tensors()[arg] if values == "valid" else template.index[arg]
    for _, view in views(t):
        assert_same_outcome(case_name, arg, view)


@pytest.mark.parametrize("case_name,arg", INDEX_ARGS)
def test_invalid_indices_are_refused_by_name(case_name, arg):
    case = make_case(case_name)
    kind, message = outcome(case, **{arg: case.index[arg]})
    assert kind == "error" and arg in message, f"{case_name}: invalid {arg} gives {kind} {message}"


@pytest.mark.parametrize("op", ["moe_grouped_gemm", "moe_grouped_gemm_wgrad"])
def test_offsets_views(op):
    def run(M, E, offsets):
        a = torch.randn(M, 8)
        if op == "moe_grouped_gemm":
            return torch.ops.llada.moe_grouped_gemm(a, torch.randn(E, 16, 8), offsets)
        return torch.ops.llada.moe_grouped_gemm_wgrad(torch.randn(M, 16), a, offsets)

    expanded = torch.zeros(1, dtype=torch.int32).expand(4)  # [0, 0, 0, 0]: 3 empty groups
    assert run(0, 3, expanded).shape == ((0, 16) if op == "moe_grouped_gemm" else (3, 16, 8))
    stepped = torch.tensor([0, 1, 4, 2, 9, 9, 3], dtype=torch.int32)[::3]  # [0, 2, 3]
    with pytest.raises(ValueError, match=r"offsets must end at M = 4 \(the rows of the input\), got 3"):
        run(4, 2, stepped)
    valid = torch.tensor([0, 9, 4, 9, 10], dtype=torch.int32)[::2]  # [0, 4, 10]
    assert run(10, 2, valid).shape == ((10, 16) if op == "moe_grouped_gemm" else (2, 16, 8))


def test_grouped_gemm_strided_offsets_match_the_reference():
    a, b = torch.randn(10, 8), torch.randn(2, 16, 8)
    offsets = torch.tensor([0, 9, 4, 9, 10], dtype=torch.int32)[::2]
    torch.testing.assert_close(moe_grouped_gemm(a, b, offsets), moe_grouped_gemm_ref(a, b, offsets.contiguous()))


def test_expanded_cu_seqlens_of_empty_documents():
    q = torch.randn(0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32).expand(3)
    out, lse = torch.ops.llada.block_attention_fwd(q, q, q, cu, cu, 0, 0, block_size=2, mask="block_causal",
                                                   softmax_scale=1.0)
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)
