"""MoE load balancing: a tiny MoE trained from scratch without balancing leaves experts unused, the
auxiliary-loss-free expert-bias update brings every expert into use (and the sequence-wise balance loss
evens the loads too); the bias is saved under its release name in fp32 and a run starting from the
checkpoint continues with it; the update rule, the balance loss and the load statistics against their
formulas; the progress bar shows the worst layer."""
import json

import pytest
import torch
from safetensors.torch import load_file

import llada_engine
from llada_engine.cli import main as cli_main
from llada_engine.training.moe_balance import balance_loss, load_stats, update_expert_bias, worst_layer
from llada_engine.training.trainer import Trainer
from llada_engine.training.config import config_from_dict
from training_testing import run_config, small_checkpoint, text_corpus, write_config

pytestmark = pytest.mark.kernels

BIAS = "model.layers.1.mlp.gate.expert_bias"


def loads(run, last=15):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["expert_load"]["1"] for r in records if "expert_load" in r][-last:]


def test_balancing_brings_a_tiny_moe_from_scratch_to_every_expert_in_use(tmp_path, capsys):
    ckpt, cfg, _ = small_checkpoint(tmp_path / "ckpt")
    corpus = text_corpus(tmp_path / "train.txt", n=160)
    runs = {}
    for name, optim in (("frozen", {}), ("bias", {"expert_bias_update_rate": 1e-2}),
                        ("aux loss", {"moe_aux_loss_coef": 0.1})):
        config = run_config(tmp_path / name, init=ckpt, train=corpus, phases=[{"objective": "ar", "steps": 80}],
                            optim=dict(optim, lr=1e-2))
        config["model"] = {"config": dict(cfg, num_experts=16), "tokenizer": str(ckpt), "init_seed": 1}
        assert cli_main(["train", str(write_config(tmp_path / f"{name}.yaml", config))]) == 0
        runs[name] = loads(tmp_path / name / "run")
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(runs["frozen"], "unused") >= 1 and mean(runs["frozen"], "cv") > 1.0
    assert all(r["unused"] == 0 for r in runs["bias"]) and mean(runs["bias"], "cv") < 0.6
    assert mean(runs["aux loss"], "cv") < 0.7 * mean(runs["frozen"], "cv")
    assert "moe=L1 max" in capsys.readouterr().err

    last = tmp_path / "bias" / "run" / "checkpoints" / "step-0000080"
    saved = load_file(last / "model.safetensors")[BIAS]
    assert saved.dtype == torch.float32 and saved.abs().max() > 0
    frozen = tmp_path / "frozen" / "run" / "checkpoints" / "step-0000080" / "model.safetensors"
    assert torch.equal(load_file(frozen)[BIAS], torch.zeros(16))
    model = llada_engine.load_model(last)
    assert torch.equal(model.model.layers[1].mlp.gate.expert_bias, saved)
    follow = run_config(tmp_path / "follow", init=last, train=corpus, phases=[{"objective": "ar", "steps": 1}])
    trainer = Trainer(config_from_dict(follow))
    assert torch.equal(trainer.module.model.layers[1].mlp.gate.expert_bias, saved)
    trainer.close()


class FakeMoE:
    def __init__(self, logits, topk_ids, bias):
        self.last_routing = (logits, topk_ids)
        self.gate = type("Gate", (), {"expert_bias": bias})()


def test_bias_update_moves_towards_balance():
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0])
    update_expert_bias([(1, FakeMoE(None, None, bias))], torch.tensor([[1.0, 5.0, 3.0, 3.0]]), 0.1)
    assert torch.allclose(bias, torch.tensor([0.6, -0.1, -0.25, 0.0]))        # mean load 3


def test_balance_loss_is_the_sequence_wise_formula():
    g = torch.Generator().manual_seed(0)
    E, k, lengths = 6, 2, [5, 1, 7]
    T = sum(lengths)
    layers = []
    for _ in range(2):
        logits = torch.randn(T, E, generator=g, requires_grad=True)
        topk = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        layers.append((1, FakeMoE(logits, topk, torch.zeros(E))))
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    got = balance_loss(layers, cu)
    want = 0.0
    for _, moe in layers:
        logits, topk = moe.last_routing
        for s in range(3):
            rows = range(cu[s], cu[s + 1])
            n = len(rows)
            for i in range(E):
                f = E / (k * n) * sum(int(i in topk[t].tolist()) for t in rows)
                p = sum((torch.sigmoid(logits[t]) / torch.sigmoid(logits[t]).sum())[i] for t in rows) / n
                want = want + f * p
    assert got.item() == pytest.approx(float(want.detach()), rel=1e-5)
    got.backward()
    assert layers[0][1].last_routing[0].grad.abs().sum() > 0


def test_load_statistics():
    stats = load_stats([(1, None), (3, None)], torch.tensor([[0.0, 2.0, 6.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert stats["1"]["max_share"] == 0.75 and stats["1"]["unused"] == 2
    assert stats["1"]["cv"] == pytest.approx(torch.tensor([0.0, 2.0, 6.0, 0.0]).std(unbiased=False).item() / 2)
    assert stats["3"] == {"max_share": 0.25, "unused": 0, "cv": 0.0}
    assert worst_layer(stats) == "L1 max 75% unused 2"
