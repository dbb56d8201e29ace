"""Checkpoint merging: the element-wise mean of the weights of several checkpoints (docs/ARCHITECTURE.md, Training).

    top_k_by_valid_loss(run_dir, k, phase=None) -> the k checkpoints of one phase of a run (the phase of its
                                                  latest checkpoint, or `phase` by name) with the lowest
                                                  validation loss: never a mix of objectives or block sizes
    merge_checkpoints(paths, out_dir) -> out_dir: config.json + safetensors (+ tokenizer.json) of the mean

The mean is taken in fp32 and written in the first checkpoint's dtype. The checkpoints must share one
config (the same architecture and shapes).
"""
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..model import load_model
from .checkpoint import list_checkpoints, load_trainer_state


def top_k_by_valid_loss(run_dir, k: int, phase: Optional[str] = None) -> list[Path]:
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    found = [(path, load_trainer_state(path)) for path in list_checkpoints(run_dir)]
    if not found:
        raise ValueError(f"{run_dir}: no checkpoints")
    phases = list(dict.fromkeys(state.get("phase") for _, state in found))
    if phase is None:
        phase = found[-1][1].get("phase")
    elif phase not in phases:
        raise ValueError(f"{run_dir}: no checkpoint of phase {phase!r} (the run's checkpoints are of "
                         f"{', '.join(map(repr, phases))})")
    scored = []
    for path, state in found:
        loss = state.get("valid_loss")
        if state.get("phase") == phase and loss is not None and math.isfinite(loss):
            scored.append((loss, path))
    if not scored:
        raise ValueError(f"{run_dir}: no checkpoint of phase {phase!r} with a validation loss (set data.valid "
                         f"in the run's config)")
    return [path for _, path in sorted(scored, key=lambda s: s[0])[:k]]


def merge_checkpoints(paths: list, out_dir) -> Path:
    if not paths:
        raise ValueError("merge: no checkpoints given")
    paths = [Path(p) for p in paths]
    merged = load_model(paths[0], dtype=torch.float32)
    first_config = json.loads((paths[0] / "config.json").read_text())
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(first_config.get("torch_dtype"), torch.float32)
    sums = {name: t.detach().clone() for name, t in merged.state_dict().items()}
    for path in paths[1:]:
        other = load_model(path, dtype=torch.float32)
        if other.config.to_dict() | {"torch_dtype": None} != merged.config.to_dict() | {"torch_dtype": None}:
            raise ValueError(f"{path}: config differs from {paths[0]}'s; only checkpoints of one model can be merged")
        for name, tensor in other.state_dict().items():
            sums[name] += tensor
    merged.load_state_dict({name: s / len(paths) for name, s in sums.items()})
    out_dir = Path(out_dir)
    merged.to(dtype).save_pretrained(out_dir)
    tokenizer = paths[0] / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    (out_dir / "merged_from.json").write_text(json.dumps([str(p) for p in paths], indent=1) + "\n")
    return out_dir
