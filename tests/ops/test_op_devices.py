"""Every op and public op wrapper refuses mixed devices by name: a meta tensor among CPU tensors (which would
dispatch to the fake implementation and return uninitialised memory) and, on a GPU, a CPU tensor among CUDA
ones (except the index tensors of the decode form and the per-sequence parameters of commit_tokens, which may
live on the CPU). All-meta arguments still give meta results of the right shapes (what torch.compile traces
with)."""
import re

import pytest
import torch

from op_cases import CASES, make_case

pytestmark = pytest.mark.kernels

PER_SEQ_PARAMS = ("threshold", "temperature", "top_k", "top_p", "seed", "offset")
ALLOWED_ON_CPU = ({(case, "cache_seqlens") for case in ("llada.block_attention_decode", "block_attention_decode",
                                                       "llada.block_attention_decode.paged",
                                                       "block_attention_decode.paged")}
                  | {(case, "block_table") for case in ("llada.block_attention_decode.paged",
                                                       "block_attention_decode.paged")}
                  | {(case, name) for case in ("llada.commit_tokens_per_seq", "llada.commit_tokens_per_seq_",
                                               "commit_tokens.per_seq") for name in PER_SEQ_PARAMS})


def error_of(case, **changes) -> ValueError:
    with pytest.raises(ValueError) as info:
        case.call(**changes)
    return info.value


def test_every_case_matches_its_reference():
    from op_cases import assert_same_result
    for name in CASES:
        case = make_case(name)
        expected = case.call(case.ref)
        assert_same_result(case.call(), expected, name=name)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_a_meta_tensor_among_cpu_tensors_is_named(case_name):
    for name, tensor in make_case(case_name).tensors().items():
        message = str(error_of(make_case(case_name), **{name: tensor.to("meta")}))
        assert "meta" in message, message
        assert re.search(rf"\b{name}\b", message), f"{case_name}: a meta {name} gives {message!r}"


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_all_meta_gives_meta_results(case_name):
    case = make_case(case_name)
    expected = case.call()
    result = case.call(**{name: t.to("meta") for name, t in case.tensors().items()})
    flat = lambda r: [r] if isinstance(r, torch.Tensor) else [t for x in r for t in flat(x)]  # noqa: E731
    for got, want in zip(flat(result), flat(expected), strict=True):
        assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype, case_name


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_a_cpu_tensor_among_cuda_tensors_is_named(case_name):
    on_gpu = {name: t.cuda() for name, t in make_case(case_name).tensors().items()}
    for name, tensor in make_case(case_name).tensors().items():
        if (case_name, name) in ALLOWED_ON_CPU:
            continue  # (test_block_attention runs the decode form so)
        message = str(error_of(make_case(case_name), **dict(on_gpu, **{name: tensor})))
        assert re.search(rf"\b{name}\b", message) and "cpu" in message, f"{case_name}: a CPU {name} gives {message!r}"
