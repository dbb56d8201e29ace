"""The embedded default model: its files are the recorded ones and small enough, it loads by name, greedy
generation from a fixed prompt is deterministic printable text, cached equals uncached, and the recipe that
made it (configs/tiny: AR pre-training, WSD conversion, SFT) parses and runs for a few steps."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada_engine
from llada_engine.model.default import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_files_match_their_checksums_and_size_limit():
    sums = json.loads((DEFAULT_MODEL_DIR / "checksums.json").read_text())
    assert set(sums) == {p.name for p in DEFAULT_MODEL_DIR.iterdir()} - {"checksums.json"}
    for name, digest in sums.items():
        assert hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest() == digest, name
    weights = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert weights <= 20 * 2**20


@pytest.mark.kernels
def test_loads_by_name_and_generates_in_bf16():
    model = llada_engine.load_model("default")
    tokenizer = llada_engine.load_tokenizer("default")
    assert model.dtype == torch.bfloat16 and tokenizer.get_vocab_size() == model.config.vocab_size
    out = llada_engine.generate(model, tokenizer.encode("ROMEO:\n").ids, gen_length=16)
    assert 0 < len(out.sequences[0]) <= 16


@pytest.fixture(scope="module")
def default_fp32():
    return llada_engine.load_model("default", dtype=torch.float32), llada_engine.load_tokenizer("default")


@pytest.mark.kernels
def test_greedy_generation_is_deterministic_printable_text(default_fp32):
    model, tokenizer = default_fp32
    prompt = tokenizer.encode("ROMEO:\n").ids
    first = llada_engine.generate(model, prompt, gen_length=64)
    again = llada_engine.generate(model, prompt, gen_length=64)
    assert first.sequences == again.sequences and len(first.sequences[0]) > 0
    text = tokenizer.decode(first.sequences[0], skip_special_tokens=True)
    assert text.strip() and all(c.isprintable() or c.isspace() for c in text)


@pytest.mark.kernels
def test_cached_equals_uncached(default_fp32):
    model, tokenizer = default_fp32
    prompts = [tokenizer.encode(p).ids for p in ("JULIET:\n", "KING HENRY:\nOnce more unto the breach")]
    for threshold in (0.7, 0.95):
        cached = llada_engine.generate(model, prompts, gen_length=64, threshold=threshold)
        uncached = llada_engine.generate(model, prompts, gen_length=64, threshold=threshold, use_cache=False)
        assert cached.sequences == uncached.sequences


@pytest.mark.kernels
def test_cli_generates_with_the_default_model():
    out = subprocess.run([sys.executable, "-m", "llada_engine.cli", "generate", "--gen-length", "32", "ROMEO:"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "TPF" in out.splitlines()[-1] and len(out.splitlines()) >= 2


@pytest.mark.kernels
def test_recipe_configs_run_a_few_steps(tmp_path):
    def train(config, out, init=None):
        overrides = [f"run.out_dir={out}", "run.eval_every=1000", "run.save_every=1000", "optim.warmup_steps=1",
                     "optim.decay_steps=1", "data.valid_rows=2", "data.batch_rows=2"]
        if init:
            overrides.append(f"model.init={init}")
        phases = {"ar_pretrain": "[{name: ar, objective: ar, steps: 2}]",
                  "wsd_conversion": "[{name: b4, objective: bdlm, block_size: 4, steps: 1},"
                                    " {name: mdlm, objective: mdlm, block_size: full, steps: 1},"
                                    " {name: b32, objective: bdlm, block_size: 32, steps: 1}]",
                  "sft": "[{name: sft, objective: bdlm, block_size: 32, steps: 2, complementary: true,"
                         " mask_band: [0.1, 0.9], weighting: mean}]"}[config]
        args = [sys.executable, "-m", "llada_engine.train", f"configs/tiny/{config}.yaml", "--set", f"phases={phases}"]
        for o in overrides:
            args += ["--set", o]
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
        return out

    ar = train("ar_pretrain", tmp_path / "ar")
    wsd = train("wsd_conversion", tmp_path / "wsd", init=ar)
    sft = train("sft", tmp_path / "sft", init=wsd)
    assert list((sft / "checkpoints").iterdir())
