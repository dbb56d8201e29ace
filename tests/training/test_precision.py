"""Mixed precision: at a learning rate where AdamW on bf16 weights loses its updates, bf16-mixed training
(fp32 masters and optimizer state, the compute in bf16) tracks fp32 and pure bf16 stalls; checkpoints hold
the release weights in bf16 (expert_bias fp32) with the fp32 masters beside them, and --resume continues
exactly from them; float16 trains with a dynamic loss scale (reference backend: the CPU kernels take no
float16); and the dtype choices that cannot work are refused by name."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import llada_engine
from llada_engine.training import train
from llada_engine.training.config import config_from_dict
from training_testing import run_config, small_checkpoint, text_corpus

pytestmark = pytest.mark.kernels

MODES = {"fp32": {}, "bf16-mixed": {"dtype": "bfloat16"},
         "pure-bf16": {"dtype": "bfloat16", "pure_low_precision": True}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    ckpt, _, _ = small_checkpoint(root / "ckpt")
    return root, ckpt, text_corpus(root / "train.txt", n=160)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_mixed_tracks_fp32_where_pure_bf16_stalls(tmp_path, setup):
    _, ckpt, corpus = setup
    drop, final = {}, {}
    for name, model in MODES.items():
        config = run_config(tmp_path / name, init=ckpt, train=corpus, model=model, optim={"lr": 1e-4},
                            phases=[{"objective": "bdlm", "steps": 20, "block_size": 8}])
        train(config_from_dict(config))
        loss = losses(tmp_path / name / "run")
        final[name] = sum(loss[-5:]) / 5
        drop[name] = sum(loss[:3]) / 3 - final[name]
    assert drop["fp32"] > 1.0
    assert final["bf16-mixed"] == pytest.approx(final["fp32"], rel=0.03)
    assert drop["pure-bf16"] < 0.6 * drop["fp32"], drop


def test_bf16_checkpoints_keep_fp32_masters_and_resume_exactly(tmp_path, setup):
    _, ckpt, corpus = setup
    phases = [{"objective": "bdlm", "steps": 4, "block_size": 8}]
    base = dict(init=ckpt, train=corpus, phases=phases, model={"dtype": "bfloat16"},
                optim={"expert_bias_update_rate": 1e-2}, run={"save_every": 2})
    train(config_from_dict(run_config(tmp_path / "a", **base)))
    first, last = (tmp_path / "a" / "run" / "checkpoints" / f"step-000000{s}" for s in (2, 4))
    release, masters = load_file(last / "model.safetensors"), load_file(last / "master.safetensors")
    assert json.loads((last / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert release["lm_head.weight"].dtype == torch.bfloat16
    assert release["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in masters.values())
    assert torch.equal(masters["lm_head.weight"].bfloat16(), release["lm_head.weight"])
    assert not torch.equal(masters["lm_head.weight"], masters["lm_head.weight"].bfloat16().float())
    assert all(t.dtype == torch.float32 for t in load_file(last / "optimizer.safetensors").values())
    assert llada_engine.load_model(last).dtype == torch.bfloat16

    resumed = tmp_path / "b" / "run" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(first, resumed / first.name)
    train(config_from_dict(run_config(tmp_path / "b", **base)), resume=True)
    for name in ("master.safetensors", "model.safetensors"):
        want, got = load_file(last / name), load_file(resumed / last.name / name)
        assert set(want) == set(got)
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)


def test_float16_trains_with_a_loss_scale(tmp_path, setup):
    _, ckpt, corpus = setup
    config = run_config(tmp_path, init=ckpt, train=corpus, model={"dtype": "float16", "backend": "reference"},
                        optim={"lr": 3e-3}, phases=[{"objective": "bdlm", "steps": 12, "block_size": 8}])
    last = train(config_from_dict(config))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 1 for r in records)
    loss = [r["loss"] for r in records]
    assert sum(loss[-3:]) < 0.8 * sum(loss[:3])
    assert json.loads((last / "trainer_state.json").read_text())["grad_scaler"]["scale"] > 1
    assert load_file(last / "model.safetensors")["lm_head.weight"].dtype == torch.float16


@pytest.mark.parametrize("model,message", [
    ({"dtype": "float16"}, "model.dtype float16 on the CPU: the CPU kernels take float32 or bfloat16"),
    ({"pure_low_precision": True}, "model.pure_low_precision: is for model.dtype bfloat16 or float16"),
])
def test_impossible_dtypes_are_refused_by_name(tmp_path, setup, model, message):
    _, ckpt, corpus = setup
    config = run_config(tmp_path, init=ckpt, train=corpus, model=model, phases=[{"objective": "ar", "steps": 1}])
    with pytest.raises(ValueError, match=message):
        train(config_from_dict(config))
