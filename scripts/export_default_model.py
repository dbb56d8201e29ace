"""Ships a trained checkpoint as the embedded default model: bf16 weights, config and tokenizer into
llada_engine/default_model/, with the SHA-256 of every file in checksums.json.

    python scripts/export_default_model.py runs/tiny-sft
"""
import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

import llada_engine
from llada_engine.model.default import DEFAULT_MODEL_DIR
from llada_engine.training.trainer import resolve_init


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    args = parser.parse_args(argv)
    source = resolve_init(args.checkpoint)
    model = llada_engine.load_model(source, dtype=torch.bfloat16)
    if DEFAULT_MODEL_DIR.exists():
        shutil.rmtree(DEFAULT_MODEL_DIR)
    model.save_pretrained(DEFAULT_MODEL_DIR)
    shutil.copy(source / "tokenizer.json", DEFAULT_MODEL_DIR / "tokenizer.json")
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(DEFAULT_MODEL_DIR.iterdir())}
    (DEFAULT_MODEL_DIR / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")
    print(f"{source} -> {DEFAULT_MODEL_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
