"""The trainer end to end on a tiny model and corpus: the loss goes down, checkpoints load with load_model and
generate, kill -9 then --resume ends with the same weights as an uninterrupted run, SFT / DPO / from-scratch
runs, top-k merging is the mean, and mismatched data is a clear error; on a GPU, a bf16 run on the CUDA
kernels learns, and fp32 on CUDA is refused by name."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import llada_engine
from llada_engine.cli import main as cli_main
from llada_engine.training import load_config, train
from llada_engine.training.config import config_from_dict
from llada_engine.training.checkpoint import list_checkpoints
from model_testing import tiny_checkpoint
from training_testing import (SMALL, dpo_corpus, run_config, sft_corpus, small_checkpoint, text_corpus,
                              write_config)

pytestmark = pytest.mark.kernels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    ckpt, cfg, _ = small_checkpoint(root / "ckpt", seed=0)
    return root, ckpt, text_corpus(root / "train.txt", n=160), text_corpus(root / "valid.txt", n=24, seed=5)


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def test_loss_goes_down_and_checkpoints_load(tmp_path, setup):
    _, ckpt, corpus, valid = setup
    config = run_config(tmp_path, init=ckpt, train=corpus, valid=valid,
                        phases=[{"objective": "bdlm", "steps": 40, "block_size": 8}],
                        optim={"lr": 1e-2, "warmup_steps": 4, "decay_steps": 10},
                        run={"eval_every": 20, "save_every": 20, "valid_t": 0.5})
    last = train(load_config(write_config(tmp_path / "c.yaml", config)))
    records = metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "valid_loss" not in r]
    valids = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert len(losses) == 40 and len(valids) == 2
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:4]) / 4
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in records if "loss" in r)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000020", "step-0000040"]
    assert json.loads((last / "trainer_state.json").read_text())["valid_loss"] == valids[-1]
    model = llada_engine.load_model(last)
    tokenizer = llada_engine.load_tokenizer(last)
    out = llada_engine.generate(model, [tokenizer.encode("the cat").ids], gen_length=16, block_length=8, steps=8)
    assert len(out.sequences[0]) > 0


def run_train_process(config: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llada_engine.train", str(config), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_gives_the_same_weights(tmp_path, setup):
    _, ckpt, corpus, valid = setup
    phases = [{"objective": "ar", "steps": 20}, {"objective": "bdlm", "steps": 30, "block_size": 4},
              {"objective": "mdlm", "steps": 30}]
    base = dict(init=ckpt, train=corpus, valid=valid, phases=phases,
                optim={"warmup_steps": 5, "decay_steps": 20, "embedding_noise_std": 0.1, "embedding_noise_steps": 30})
    straight = write_config(tmp_path / "straight.yaml", run_config(tmp_path / "a", **base, run={"save_every": 10}))
    killed = write_config(tmp_path / "killed.yaml", run_config(tmp_path / "b", **base, run={"save_every": 10}))
    assert cli_main(["train", str(straight)]) == 0

    proc = run_train_process(killed)
    marker = tmp_path / "b" / "run" / "checkpoints" / "step-0000040"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in list_checkpoints(tmp_path / "b" / "run")]
    assert "step-0000080" not in done, "the run ended before it was killed: make it longer"
    resumed = run_train_process(killed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    want, got = weights(a / "checkpoints" / "step-0000080"), weights(b / "checkpoints" / "step-0000080")
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds")} for r in rs]  # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))


def test_merge_top_k_is_the_mean(tmp_path, setup):
    _, ckpt, corpus, valid = setup
    config = run_config(tmp_path, init=ckpt, train=corpus, valid=valid,
                        phases=[{"objective": "bdlm", "steps": 6, "block_size": 8}], run={"save_every": 2})
    train(load_config(write_config(tmp_path / "c.yaml", config)))
    found = list_checkpoints(tmp_path / "run")
    losses = {p: json.loads((p / "trainer_state.json").read_text())["valid_loss"] for p in found}
    best = sorted(found, key=losses.get)[:2]
    assert cli_main(["merge", "--run", str(tmp_path / "run"), "--top-k", "2", "--out", str(tmp_path / "merged")]) == 0
    merged = weights(tmp_path / "merged")
    parts = [weights(p) for p in best]
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (parts[0][name] + parts[1][name]) / 2, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "merged" / "merged_from.json").read_text()) == [str(p) for p in best]
    llada_engine.load_model(tmp_path / "merged")


def test_merge_top_k_chooses_within_one_phase(tmp_path, setup, capsys):
    _, ckpt, corpus, valid = setup
    phases = [{"name": "wide", "objective": "bdlm", "steps": 3, "block_size": 8},
              {"name": "narrow", "objective": "bdlm", "steps": 2, "block_size": 4}]
    config = run_config(tmp_path, init=ckpt, train=corpus, valid=valid, phases=phases, run={"save_every": 1})
    train(load_config(write_config(tmp_path / "c.yaml", config)))
    run = tmp_path / "run"
    phase_of = {p: json.loads((p / "trainer_state.json").read_text())["phase"] for p in list_checkpoints(run)}
    for args, phase in (([], "narrow"), (["--phase", "wide"], "wide")):
        out = tmp_path / f"merged-{phase}"
        assert cli_main(["merge", "--run", str(run), "--top-k", "5", "--out", str(out), *args]) == 0
        merged = [Path(p) for p in json.loads((out / "merged_from.json").read_text())]
        assert sorted(merged) == sorted(p for p, name in phase_of.items() if name == phase)
    capsys.readouterr()
    assert cli_main(["merge", "--run", str(run), "--phase", "other", "--out", str(tmp_path / "x")]) == 1
    assert "no checkpoint of phase 'other'" in capsys.readouterr().err


def test_sft_dpo_and_from_scratch_runs(tmp_path, setup):
    root, ckpt, corpus, _ = setup
    sft = run_config(tmp_path / "sft", init=ckpt, train=sft_corpus(tmp_path / "s.jsonl"),
                     phases=[{"objective": "bdlm", "steps": 3, "block_size": 8, "complementary": True,
                              "mask_band": [0.2, 0.8], "weighting": "mean", "cap_lambda": 0.1}],
                     run={"save_every": 1, "keep_last": 2})
    train(load_config(write_config(tmp_path / "sft.yaml", sft)))
    assert [p.name for p in list_checkpoints(tmp_path / "sft" / "run")] == ["step-0000002", "step-0000003"]
    dpo = run_config(tmp_path / "dpo", init=ckpt, train=dpo_corpus(tmp_path / "d.jsonl"),
                     phases=[{"objective": "dpo", "steps": 3, "block_size": 8, "beta": 0.1}])
    train(load_config(write_config(tmp_path / "dpo.yaml", dpo)))
    for r in metrics(tmp_path / "dpo" / "run"):
        assert r["objective"] == "dpo" and 0.0 <= r["reward_accuracy"] <= 1.0 and r["pairs"] >= 4
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"])
    scratch = run_config(tmp_path / "scratch", init=ckpt, train=corpus, phases=[{"objective": "ar", "steps": 2}])
    scratch["model"] = {"config": str(ckpt / "config.json"), "tokenizer": str(ckpt), "init_seed": 1}
    last = train(load_config(write_config(tmp_path / "scratch.yaml", scratch)))
    llada_engine.load_model(last)
    follow = run_config(tmp_path / "follow", init=tmp_path / "scratch" / "run", train=corpus,
                        phases=[{"objective": "mdlm", "steps": 1}])
    train(load_config(write_config(tmp_path / "follow.yaml", follow)))


def test_shipped_dpo_example_logs_its_rewards(tmp_path):
    """configs/tiny/dpo.yaml on its preference files, from a small random model with the shipped tokenizer:
    every pair fits a row, the first step is the reference itself (loss log 2, margin 0), rewards are logged."""
    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "configs" / "tiny" / "dpo.yaml").read_text())
    model = json.loads((repo / "configs" / "tiny" / "model.json").read_text())
    model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
                 num_experts=8)
    raw["model"] = {"config": model, "tokenizer": str(repo / "data" / "tokenizer.json")}
    for key in ("train", "valid"):
        raw["data"][key] = str(repo / raw["data"][key])
    raw["data"].update(batch_rows=2, valid_rows=2)
    raw["optim"].update(lr=3e-3, warmup_steps=0, decay_steps=0)
    raw["run"].update(out_dir=str(tmp_path / "run"), eval_every=0, save_every=0)
    raw["phases"][0].update(steps=3)
    train(config_from_dict(raw))
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all({"reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= set(r)
                                   for r in steps)
    assert steps[0]["reward_margin"] == 0.0 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[1]["reward_margin"] != 0.0 and "valid_loss" in records[-1]


def test_mismatched_data_and_resume_without_checkpoint(tmp_path, setup):
    _, ckpt, corpus, _ = setup
    wrong = run_config(tmp_path, init=ckpt, train=corpus, phases=[{"objective": "dpo", "steps": 1}])
    with pytest.raises(ValueError, match=r"phases\[0\]\.objective 'dpo' cannot train on text data"):
        train(load_config(write_config(tmp_path / "w.yaml", wrong)))
    fresh = run_config(tmp_path / "fresh", init=ckpt, train=corpus, phases=[{"objective": "ar", "steps": 1}])
    with pytest.raises(FileNotFoundError, match="--resume found no checkpoint"):
        train(load_config(write_config(tmp_path / "f.yaml", fresh)), resume=True)
    train(load_config(tmp_path / "f.yaml"))
    with pytest.raises(FileExistsError, match="already has checkpoints; continue it with --resume"):
        train(load_config(tmp_path / "f.yaml"))
    rows = run_config(tmp_path / "rows", init=ckpt, train=corpus, phases=[{"objective": "ar", "steps": 1}])
    rows["data"]["row_length"] = 16
    with pytest.raises(ValueError, match="longer than data.row_length 16"):
        train(load_config(write_config(tmp_path / "r.yaml", rows)))


@pytest.mark.gpu
def test_cuda_bf16_run_learns_and_fp32_is_refused(tmp_path, setup):
    root, _, corpus, _ = setup
    ckpt, _, _ = tiny_checkpoint(tmp_path / "ckpt", seed=3, **SMALL, head_dim=64)  # D 64 for the CUDA kernels
    config = run_config(tmp_path, init=ckpt, train=corpus, phases=[{"objective": "bdlm", "steps": 30, "block_size": 8}],
                        optim={"lr": 1e-2, "warmup_steps": 3}, model={"dtype": "bfloat16"}, run={"device": "cuda"})
    train(load_config(write_config(tmp_path / "c.yaml", config)))
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 30 and sum(losses[-6:]) / 6 < 0.8 * sum(losses[:3]) / 3
    config["model"]["dtype"] = "float32"
    config["run"]["out_dir"] = str(tmp_path / "run32")
    with pytest.raises(ValueError, match="model.dtype float32 on CUDA"):
        train(load_config(write_config(tmp_path / "c32.yaml", config)))
