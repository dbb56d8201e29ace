"""generate()'s arguments, checked in one place (llada_engine/decoding/validation.py) for every backend:
prompts of token ids only (Python or numpy ints, integer tensors; never floats, strings, bytes or bools),
ints that are not bools, sampling settings in range, a temperature that cannot overflow, 64-bit seeds, a
context that fits max_position_embeddings; each refusal names the argument. Runs on the reference backend,
so it needs no compiled kernels."""
import inspect

import numpy as np
import pytest
import torch

import llada_engine
from llada_engine.decoding import validation
from llada_engine.decoding.validation import ArgumentError, check_prompts, decode_params, stream_seed
from model_testing import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("validation"), seed=51)
    return llada_engine.load_model(path, backend="reference")


def refused(model, prompts, message, argument=None, **kwargs):
    with pytest.raises(ArgumentError) as error:
        llada_engine.generate(model, prompts, **kwargs)
    assert str(error.value) == message
    if argument:
        assert error.value.argument == argument
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("prompts,message", [
    ([1, 2.5, 3], "prompts[1] is 2.5 (float): expected an int token id"),
    ([[1, 2], [3, 4.0]], "prompts[1][1] is 4.0 (float): expected an int token id"),
    ([1, True], "prompts[1] is True (bool): expected an int token id"),
    ("hello", "prompts is a str: expected token ids (encode text with the checkpoint's tokenizer first)"),
    (b"hello", "prompts is a bytes: expected token ids (encode text with the checkpoint's tokenizer first)"),
    (["hello", "world"], "prompts[0] is a str: expected token ids (encode text with the checkpoint's tokenizer "
                         "first)"),
    ([[1], b"ab"], "prompts[1] is a bytes: expected token ids (encode text with the checkpoint's tokenizer first)"),
    ([[1], [2, "3"]], "prompts[1][1] is '3' (str): expected an int token id"),
    (torch.tensor([1.0, 2.0]), "prompts has dtype torch.float32: expected integer token ids"),
    ([torch.tensor([1, 2]), torch.tensor([True])], "prompts[1] has dtype torch.bool: expected integer token ids"),
    (np.array([1.5]), "prompts has dtype float64: expected integer token ids"),
    ([], "prompts is empty: give at least one prompt"),
    ([[1], []], "prompts[1] is empty: a prompt needs at least one token"),
    ([[1, 500]], "prompts[0] has token ids outside [0, 96): prompts[0][1] is 500"),
    ([3, -1], "prompts has token ids outside [0, 96): prompts[1] is -1"),
    (7, "prompts is 7 (int): expected token ids or a list of prompts"),
])
def test_prompts_of_token_ids_only(model, prompts, message):
    refused(model, prompts, message, "prompts")


def test_numpy_ints_and_integer_tensors_are_token_ids(model):
    want = llada_engine.generate(model, [[5, 6, 7], [8]], gen_length=8, block_length=4).sequences
    for prompts in ([np.array([5, 6, 7]), np.array([8], dtype=np.int32)],
                    [torch.tensor([5, 6, 7]), torch.tensor([8], dtype=torch.int16)],
                    [[np.int64(5), np.int32(6), 7], [np.uint8(8)]]):
        assert llada_engine.generate(model, prompts, gen_length=8, block_length=4).sequences == want
    assert check_prompts(torch.tensor([[1, 2], [3, 4]]), 96) == [[1, 2], [3, 4]]
    assert check_prompts(np.array([9, 8]), 96) == [[9, 8]]


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=True), "gen_length must be a positive int, got True (bool)"),
    (dict(gen_length=0), "gen_length must be a positive int, got 0"),
    (dict(block_length=4.0), "block_length must be a positive int, got 4.0 (float)"),
    (dict(steps=np.bool_(True)), f"steps must be a positive int, got {np.bool_(True)!r} "
                                 f"({type(np.bool_(True)).__name__})"),
    (dict(threshold=1.5), "threshold must be a number in [0, 1], got 1.5"),
    (dict(threshold=float("nan")), "threshold must be a number in [0, 1], got nan"),
    (dict(temperature=-1), "temperature must be 0 (greedy) or a finite number >= 0.0001 (smaller ones overflow "
                           "logits / temperature), got -1.0"),
    (dict(temperature=1e-45), "temperature must be 0 (greedy) or a finite number >= 0.0001 (smaller ones "
                              "overflow logits / temperature), got 1e-45"),
    (dict(temperature=float("inf")), "temperature must be 0 (greedy) or a finite number >= 0.0001 (smaller ones "
                                     "overflow logits / temperature), got inf"),
    (dict(top_p=0), "top_p must be a number in (0, 1], got 0.0"),
    (dict(top_p=1.01), "top_p must be a number in (0, 1], got 1.01"),
    (dict(top_k=-1), "top_k must be an int >= 0 (0: no top-k), got -1"),
    (dict(seed=2**64), "seed must be an int in [0, 2**64), got 18446744073709551616"),
    (dict(seed=-1), "seed must be an int in [0, 2**64), got -1"),
    (dict(seed=1.0), "seed must be an int in [0, 2**64), got 1.0 (float)"),
    (dict(eos_early_stop=1), "eos_early_stop must be True or False, got 1"),
    (dict(mask_id=1000), "mask_id must be a token id in [0, 96), got 1000"),
    (dict(mask_id=94), "eos_id and mask_id are both 94: EOS must be another token"),
    (dict(eos_id=-3), "eos_id must be a token id in [0, 96), got -3"),
    (dict(use_cache="no"), "use_cache must be True or False, got 'no'"),
    (dict(stream=print, use_cache=1), "use_cache must be True or False, got 1"),
    (dict(stream="out.txt"), "stream must be None or a callable(prompt_index, tokens), got 'out.txt'"),
])
@pytest.mark.parametrize("op_backend", ["reference", "kernels"])
def test_every_backend_refuses_what_it_cannot_decode(model, kwargs, message, op_backend):
    model.backend = op_backend     # refused before any op runs: the kernels stay hidden from this test
    try:
        refused(model, [1, 2, 3], message, **kwargs)
    finally:
        model.backend = "reference"


def test_prompt_and_generation_must_fit_the_positions(model):
    refused(model, [[1] * 10, [2] * 100], "prompts[1]: 100 prompt tokens + gen_length 4000, in whole blocks of "
            "block_length 32, run 4128 positions, more than the model's max_position_embeddings 4096",
            "gen_length", gen_length=4000)
    refused(model, [1] * 96, "prompts[0]: 96 prompt tokens + gen_length 5000, in whole blocks of block_length 32, "
            "run 5120 positions, more than the model's max_position_embeddings 4096", "gen_length", gen_length=5000)
    params = decode_params(model.config, gen_length=4064, block_length=32)
    validation.check_positions(32, params, 4096)                       # exactly 4096 positions
    with pytest.raises(ArgumentError, match="run 4128 positions"):
        validation.check_positions(33, params, 4096)


def test_params_are_resolved_and_steps_capped(model):
    params = decode_params(model.config, gen_length=8, steps=32, threshold=1, temperature=np.float32(0.5), top_k=5)
    assert params.mask_id == 95 and params.eos_id == 94 and params.steps == 8
    assert isinstance(params.threshold, float) and params.temperature == 0.5 and params.top_k == 5
    with pytest.raises(AttributeError):
        params.steps = 3                                                # frozen
    assert params.positions(9) == 32


@pytest.mark.parametrize("op_backend", ["reference", pytest.param("kernels", marks=pytest.mark.kernels)])
def test_a_top_k_beyond_the_vocabulary_keeps_every_token(model, op_backend):
    model.backend = op_backend
    try:
        kw = dict(gen_length=8, block_length=4, temperature=1.0, seed=5)
        want = llada_engine.generate(model, [3, 4], top_k=96, **kw).sequences
        for top_k in (97, 2**63, 2**70):
            assert decode_params(model.config, top_k=top_k).top_k == 96
            assert llada_engine.generate(model, [3, 4], top_k=top_k, **kw).sequences == want
    finally:
        model.backend = "reference"


def test_the_defaults_are_generates():
    generate = inspect.signature(llada_engine.generate).parameters
    for name, parameter in inspect.signature(decode_params).parameters.items():
        if parameter.kind is parameter.KEYWORD_ONLY:
            assert generate[name].default == parameter.default, name


def test_seeds_cover_64_bits_and_wrap(model):
    assert stream_seed(0, 0) == 0 and stream_seed(2**64 - 1, 0) == -1 and stream_seed(2**64 - 1, 1) == 0
    assert stream_seed(2**63, 0) == -(2**63) and stream_seed(2**63 - 1, 0) == 2**63 - 1
    kw = dict(gen_length=8, block_length=4, steps=4, threshold=0.5, temperature=1.0, top_p=0.9)
    prompts = [[3, 4, 5], [6, 7]]
    batch = llada_engine.generate(model, prompts, seed=2**64 - 1, **kw).sequences   # prompt 1 draws from seed 0
    assert batch[0] == llada_engine.generate(model, prompts[0], seed=2**64 - 1, **kw).sequences[0]
    assert batch[1] == llada_engine.generate(model, prompts[1], seed=0, **kw).sequences[0]
