"""torchrun --nproc_per_node 2 (gloo, CPU) with DDP and with FSDP2 gives the losses and the weights of one
process with the same global batch (masks and MASK-embedding noise included)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llada_engine.training import load_config, train
from training_testing import run_config, small_checkpoint, text_corpus, write_config

pytestmark = pytest.mark.kernels


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    ckpt, _, _ = small_checkpoint(tmp_path / "ckpt")
    corpus, valid = text_corpus(tmp_path / "train.txt", n=80), text_corpus(tmp_path / "valid.txt", n=16, seed=3)
    phases = [{"objective": "ar", "steps": 2}, {"objective": "bdlm", "steps": 2, "block_size": 4, "cap_lambda": 0.1},
              {"objective": "mdlm", "steps": 2}]
    base = dict(init=ckpt, train=corpus, valid=valid, phases=phases, run={"save_every": 3},
                optim={"embedding_noise_std": 0.2, "embedding_noise_steps": 4})
    train(load_config(write_config(tmp_path / "one.yaml", run_config(tmp_path / "one", **base))))
    want = records(tmp_path / "one" / "run")
    want_weights = load_file(tmp_path / "one" / "run" / "checkpoints" / "step-0000006" / "model.safetensors")
    for parallel in ("ddp", "fsdp"):
        config = write_config(tmp_path / f"{parallel}.yaml", run_config(tmp_path / parallel, **base))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "llada_engine.train", str(config), "--set", f"run.parallel={parallel}"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = records(tmp_path / parallel / "run")
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for a, b in zip(want, got):
            key = "valid_loss" if "valid_loss" in a else "loss"
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (parallel, a, b)
            if key == "loss":
                assert a["tokens"] == b["tokens"]
        weights = load_file(tmp_path / parallel / "run" / "checkpoints" / "step-0000006" / "model.safetensors")
        for name, tensor in want_weights.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{parallel}: {name}")
