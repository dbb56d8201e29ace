"""Model FLOPs of a step (flops.py) against what a forward does: the attended (query, key) pairs against the
dense masks, and the matrix products against torch's FLOP counter on the reference op set (where the routed
experts multiply only their own tokens); MFU in metrics.jsonl is the FLOP rate over the stated peak."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llada_engine.model import LLaDA2Config
from llada_engine.model.init import random_model
from llada_engine.ops.block_attention import block_mask_dense
from llada_engine.training import load_config, train
from llada_engine.training.flops import attended_pairs, forward_flops, peak_flops
from model_testing import TINY_CONFIG
from training_testing import run_config, small_checkpoint, text_corpus, write_config


@pytest.mark.parametrize("n", [1, 5, 16, 37])
@pytest.mark.parametrize("block", [1, 4, 7, 64])
def test_attended_pairs_are_the_true_entries_of_the_mask(n, block):
    assert attended_pairs(n, block, "block_causal") == int(block_mask_dense("block_causal", block, n, n).sum())
    assert attended_pairs(n, block, "bd3") == int(block_mask_dense("bd3", block, 2 * n, 2 * n).sum())


@pytest.mark.parametrize("mask", ["block_causal", "bd3"])
def test_forward_flops_are_the_matrix_products_of_a_forward(mask):
    config = LLaDA2Config.from_dict(TINY_CONFIG)
    model = random_model(config, seed=3, backend="reference")
    lengths, block = [5, 17, 1], 4
    g = torch.Generator().manual_seed(0)
    per_call = [2 * n if mask == "bd3" else n for n in lengths]
    ids = torch.randint(0, config.vocab_size - 2, (sum(per_call),), generator=g)
    cu_seqlens = torch.tensor([0, *torch.tensor(per_call).cumsum(0).tolist()], dtype=torch.int32)
    logits_at = torch.tensor([0, 3, 9, 20])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, cu_seqlens, block_size=block, mask=mask, logits_at=logits_at)
    counts = counter.get_flop_counts()["Global"]
    products = sum(v for op, v in counts.items() if "scaled_dot_product" not in str(op))
    assert products > 0 and len(counts) > len([op for op in counts if "scaled_dot_product" in str(op)])
    H, D = config.num_attention_heads, config.head_dim
    attention = 2 * 2 * H * D * config.num_hidden_layers * sum(attended_pairs(n, block, mask) for n in lengths)
    assert forward_flops(config, lengths, block, mask, len(logits_at)) == products + attention


@pytest.mark.kernels
def test_mfu_is_the_flop_rate_over_the_stated_peak(tmp_path):
    ckpt, _, _ = small_checkpoint(tmp_path / "init")
    corpus = text_corpus(tmp_path / "train.txt")
    config = run_config(tmp_path, init=ckpt, train=corpus, phases=[{"objective": "bdlm", "steps": 2,
                                                                              "block_size": 8}],
                        run={"peak_tflops": 0.5})
    train(load_config(write_config(tmp_path / "c.yaml", config)))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / r["seconds"] / 0.5)
    assert peak_flops(0.0, torch.device("cpu")) is None and peak_flops(2.0, torch.device("cpu")) == 2e12
