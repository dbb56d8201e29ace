"""Training checkpoints: RUN/checkpoints/step-NNNNNNN/, written atomically (a temporary folder, then rename).

    config.json, model.safetensors   the weights in the release format (model.save_pretrained) in the run's
                                     model.dtype, expert_bias in fp32: load_model and generate read the folder
                                     as it is
    master.safetensors               the fp32 master weights by parameter name, when model.dtype is not fp32
                                     (mixed precision): what --resume and a run starting from the folder use
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

from ..model.checkpoint import load_model
from ..model.model import LLaDA2Model

STEP_DIR = re.compile(r"step-(\d{7,})")
MASTER_FILE = "master.safetensors"


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
                    *, sharded: bool, rank: int, release_dtype: torch.dtype) -> Path:
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
        params = {name for name, _ in module.named_parameters()}
        with torch.device("meta"):
            plain = LLaDA2Model(module.config, backend=module.backend)
        plain.load_state_dict({k: v.detach().cpu().to(release_dtype if k in params else torch.float32)
                               for k, v in weights.items()}, assign=True)
        plain.save_pretrained(temp)
        masters = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k in params}
        if any(v.dtype != release_dtype for v in masters.values()):
            save_file(masters, temp / MASTER_FILE)
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


def parameters_to(model: LLaDA2Model, dtype: torch.dtype) -> LLaDA2Model:
    """Casts the parameters of `model` to `dtype` and its buffers (expert_bias) to fp32."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.float()
    return model


def load_weights(path: Path, *, dtype: torch.dtype, device, backend: str) -> LLaDA2Model:
    """The model of checkpoint folder `path` for training: its parameters in `dtype` (from its fp32 masters
    when it has them), its expert_bias in fp32."""
    model = parameters_to(load_model(path, device=device, backend=backend), dtype)   # from the file's dtypes
    masters = path / MASTER_FILE
    if masters.is_file():
        tensors = load_file(masters)
        params = dict(model.named_parameters())
        if set(tensors) != set(params):
            raise ValueError(f"{masters}: holds {len(tensors)} tensors, the model has {len(params)} parameters")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"{masters}: tensor {name} has shape {list(tensor.shape)}, expected "
                                     f"{list(params[name].shape)}")
                params[name].copy_(tensor)
    return model.train()


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
