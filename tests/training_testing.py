"""Helpers of the training tests: a tiny checkpoint (hidden 32, 2 layers) with the char tokenizer, tiny
corpora in every data format, and run configurations written for them."""
import json
from pathlib import Path

import yaml

from model_testing import tiny_checkpoint

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "moe_intermediate_size": 16}
EOS, MASK = 94, 95


def small_checkpoint(path: Path, seed: int = 0):
    """(folder, config dict, state dict) of a tiny LLaDA2.0 checkpoint with tokenizer.json."""
    return tiny_checkpoint(path, seed=seed, **SMALL)


def text_corpus(path: Path, n: int = 120, seed: int = 0) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "house"]
    docs = []
    for i in range(n):
        k = 4 + (i * 7 + seed) % 9
        docs.append(" ".join(words[(i * 3 + j * 5 + seed) % len(words)] for j in range(k)) + ".")
    path.write_text("\n\n".join(docs) + "\n")
    return path


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_corpus(path: Path, n: int = 40) -> Path:
    return jsonl(path, [{"prompt": f"q{i}: cat?", "response": f" the cat sat {i % 5}."} for i in range(n)])


def dpo_corpus(path: Path, n: int = 16) -> Path:
    return jsonl(path, [{"prompt": f"q{i}?", "chosen": f" yes {i}.", "rejected": f" no no {i}!"} for i in range(n)])


def run_config(tmp: Path, *, init: Path, train: Path, phases: list, valid: Path = None, **sections) -> dict:
    config = {
        "model": {"init": str(init)},
        "data": {"train": str(train), "row_length": 64, "batch_rows": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "decay_steps": 0},
        "run": {"out_dir": str(tmp / "run"), "threads": 1, "device": "cpu"},
        "phases": phases,
    }
    if valid is not None:
        config["data"]["valid"] = str(valid)
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
