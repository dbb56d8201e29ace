"""Training checkpoints: RUN/checkpoints/step-NNNNNNN/, written atomically (a temporary folder, then rename).

    config.json, model.safetensors   the weights in the release format (model.save_pretrained): load_model
                                     and generate read the folder as it is
    tokenizer.json                   the run's tokenizer
    optimizer.safetensors            AdamW state per parameter, as "<parameter>::<key>" (step, exp_avg, ...)
    optimizer.json                   the optimizer's param groups, parameters named
    rng.safetensors                  the torch RNG states
    trainer_state.json               step (steps done), data position, validation loss, phase, lr

A folder named step-N is always complete: a run killed while writing leaves only a .tmp-* folder, which
the next save or resume removes. Nothing is pickled. Under FSDP the full state is gathered on rank 0,
which writes; every process calls save and load.
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from ..model.model import LLaDA2Model

STEP_DIR = re.compile(r"step-(\d{7,})")


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, module: LLaDA2Model, optimizer, state: dict, tokenizer_file: Optional[str],
                    *, sharded: bool, rank: int) -> Path:
    """Writes checkpoint `step` of the run (all processes call; rank 0 writes)."""
    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    weights = get_model_state_dict(module, options=options)
    optim = get_optimizer_state_dict(module, optimizer, options=options)
    final = checkpoint_dir(run_dir, step)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        temp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        with torch.device("meta"):
            plain = LLaDA2Model(module.config, backend=module.backend)
        plain.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
        plain.save_pretrained(temp)
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, temp / "tokenizer.json")
        tensors = {f"{name}::{key}": value.detach().cpu().contiguous()
                   for name, entry in optim["state"].items() for key, value in entry.items()}
        save_file(tensors, temp / "optimizer.safetensors")
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
        (temp / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, temp / "rng.safetensors")
        (temp / "trainer_state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        _fsync_tree(temp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def load_optimizer(path: Path, module: LLaDA2Model, optimizer, *, sharded: bool) -> None:
    """Restores the optimizer of checkpoint `path` into `optimizer` (built over `module`'s parameters)."""
    tensors = load_file(path / "optimizer.safetensors")
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    state: dict = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(name, {})[field] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=sharded))


def load_rng(path: Path) -> None:
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if states:
            torch.cuda.set_rng_state_all(states)
