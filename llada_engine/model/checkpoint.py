"""Official LLaDA2.0 checkpoints in and out: config.json + safetensors (one file, or shards with
model.safetensors.index.json) under the release's tensor names. Nothing is ever unpickled.

Loading builds the model on the meta device, gives each parameter its storage in the checkpoint's (or the
requested) dtype on the target device, and copies the tensors in one at a time, so a large checkpoint is
never held twice. The per-expert tensors `mlp.experts.E.{gate,up,down}_proj.weight` are copied into the
stacked `mlp.w13` / `mlp.w2` of their layer; saving writes them back per expert.
"""
import dataclasses
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import LLaDA2Config
from .hub import resolve_checkpoint
from .model import LLaDA2Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float32}
SHARD_PATTERNS = ("model{suffix}.safetensors", "model-alt{suffix}.safetensors")  # the second if the first is taken
PROGRESS_BYTES = 1 << 30  # load_model shows a progress bar from this size on, unless told otherwise


def release_tensors(model: LLaDA2Model) -> Iterator[tuple[str, torch.Tensor, str, tuple]]:
    """(release name, our tensor, our parameter name, index into it) for every tensor of a checkpoint."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    I = model.config.moe_intermediate_size
    for name, tensor in state.items():
        stacked = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.(w13|w2)", name)
        if stacked is None:
            yield name, tensor, name, ()
            continue
        prefix, which = stacked.groups()
        for e in range(tensor.shape[0]):
            if which == "w13":
                yield f"{prefix}.experts.{e}.gate_proj.weight", tensor, name, (e, slice(0, I))
                yield f"{prefix}.experts.{e}.up_proj.weight", tensor, name, (e, slice(I, 2 * I))
            else:
                yield f"{prefix}.experts.{e}.down_proj.weight", tensor, name, (e,)


def plain_file_name(index: Path, name: str, file) -> str:
    """An index entry, which must be a plain file name inside the checkpoint folder (no path, no '..')."""
    if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
        raise ValueError(f"{index}: weight_map entry of {name} is {file!r}: expected a plain file name inside "
                         f"{index.parent}")
    return file


def read_index(index: Path) -> dict[str, str]:
    """The weight_map (release tensor name -> shard file name) of a safetensors index file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must be a JSON object of tensor name -> file name")
    return {name: plain_file_name(index, name, file) for name, file in weight_map.items()}


def _weight_files(path: Path) -> dict[str, Path]:
    """Release tensor name -> the file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        return {name: path / file for name, file in read_index(index).items()}
    single = path / SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise _unreadable(single, error) from None
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")


def _materialize(model: LLaDA2Model, dtypes: dict[str, torch.dtype], device) -> None:
    """Replaces every meta parameter and buffer by uninitialised storage of the given dtype on `device`."""
    for module_name, module in model.named_modules():
        for registry in (module._parameters, module._buffers):
            for key, value in list(registry.items()):
                if value is None or not value.is_meta:
                    continue
                full = f"{module_name}.{key}" if module_name else key
                storage = torch.empty(value.shape, dtype=dtypes[full], device=device)
                registry[key] = (torch.nn.Parameter(storage, requires_grad=value.requires_grad)
                                 if isinstance(value, torch.nn.Parameter) else storage)


def _unreadable(file: Path, error: Exception) -> ValueError:
    """An error naming the file and, when the header is intact but the data is cut, the first cut tensor."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                return ValueError(f"{file}: not a safetensors file: its header length field says {header_len} "
                                  f"bytes, but the file has {size}")
            header = json.loads(f.read(header_len))
        data_len = size - 8 - header_len
        cut = [name for name, info in header.items() if name != "__metadata__" and info["data_offsets"][1] > data_len]
        if cut:
            return ValueError(f"{file}: truncated, tensor {cut[0]} ends past the end of the file")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ValueError(f"{file}: not a readable safetensors file ({error})")


def _model_dtypes(model: LLaDA2Model, plan, stored: dict[str, str], dtype: Optional[torch.dtype]) -> dict:
    """Our parameter/buffer name -> the dtype it gets. With `dtype` given, every tensor takes it. Else the
    parameters take the checkpoint's dtype (the one most of their elements are stored in: a tensor stored in
    another is cast to it, so the model never mixes dtypes) and buffers (the router's expert_bias, which a
    release may keep in fp32) keep their own."""
    buffers = {name for name, _ in model.named_buffers()}
    if dtype is not None:
        return {ours: dtype for _, _, ours, _ in plan}
    elements: dict[str, int] = {}
    for release, tensor, ours, index in plan:
        if ours not in buffers:
            code = stored[release]
            elements[code] = elements.get(code, 0) + (tensor[index] if index else tensor).numel()
    main = _DTYPES[max(sorted(elements), key=elements.get)] if elements else torch.float32
    return {ours: (_DTYPES[stored[release]] if ours in buffers else main) for release, _, ours, _ in plan}


def load_model(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None, device=None,
               backend: str = "kernels", progress: Optional[bool] = None,
               revision: Optional[str] = None, parallel: Optional[str] = None) -> LLaDA2Model:
    """Loads an official LLaDA2.0 checkpoint (or one saved by save_pretrained): a local folder, a Hugging Face
    Hub id (at `revision`; see hub.py), or "default", the embedded default model. `dtype` None keeps the
    checkpoint's dtype. `progress` shows a progress bar on stderr (None: for checkpoints of 1 GB and more).
    parallel="tp": this process's part of a tensor- and expert-parallel model over the default process group
    (llada_engine/parallel), read slice by slice."""
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be None, torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    path = resolve_checkpoint(path, revision=revision)
    if parallel is not None:
        from ..parallel import PARALLEL, load_sharded

        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be None or one of {PARALLEL}, got {parallel!r}")
        return load_sharded(path, dtype=dtype, device=device, backend=backend, progress=progress)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    config = LLaDA2Config.from_file(path / "config.json")
    files = _weight_files(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = LLaDA2Model(config, backend=backend)

    plan = list(release_tensors(model))
    handles = {}
    try:
        def handle(file: Path):
            if file not in handles:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: missing shard")
                try:
                    handles[file] = safe_open(file, framework="pt", device="cpu")
                except Exception as error:
                    raise _unreadable(file, error) from None
            return handles[file]

        stored = {}
        for release, _, _, _ in plan:
            if release not in files:
                raise ValueError(f"{path}: checkpoint lacks tensor {release}")
            stored[release] = handle(files[release]).get_slice(release).get_dtype()
            if stored[release] not in _DTYPES:
                raise ValueError(f"{files[release]}: tensor {release} is stored as {stored[release]}, expected a "
                                 f"floating dtype ({', '.join(_DTYPES)})")
        unexpected = sorted(set(files) - {release for release, *_ in plan})
        if unexpected:
            raise ValueError(f"{path}: tensors not in a LLaDA2.0 model of this config: {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        _materialize(model, _model_dtypes(model, plan, stored, dtype), device)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        targets = [params[ours][index] if index else params[ours] for _, _, ours, index in plan]
        total = sum(t.numel() * t.element_size() for t in targets)
        show = progress if progress is not None else total >= PROGRESS_BYTES
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show)
        with torch.no_grad(), bar:
            for (release, _, _, _), target in zip(plan, targets):
                file = files[release]
                try:
                    tensor = handle(file).get_tensor(release)
                except Exception as error:
                    raise ValueError(f"{file}: cannot read tensor {release} ({error})") from None
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"{file}: tensor {release} has shape {list(tensor.shape)}, "
                                     f"expected {list(target.shape)}")
                target.copy_(tensor)
                bar.update(target.numel() * target.element_size())
                del tensor
    finally:
        handles.clear()
    return model.eval()


def parse_size(size: Union[int, str]) -> int:
    """Bytes (> 0) from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {size!r}")
    given = size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if match is None:
            raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {size!r}")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(number * scale)
    if size <= 0:
        raise ValueError(f"max_shard_size must be more than 0 bytes, got {given!r}")
    return size


def checkpoint_files(path: Path) -> set[str]:
    """The file names a checkpoint folder's weights consist of: its index and every safetensors shard the index
    names, or its single model.safetensors. An unreadable index owns nothing but itself."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            return {INDEX_FILE, *(file for file in read_index(index).values() if file.endswith(".safetensors"))}
        except ValueError:
            return {INDEX_FILE}
    return {SINGLE_FILE} if (path / SINGLE_FILE).is_file() else set()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_pretrained(model: LLaDA2Model, path: Union[str, Path], *, max_shard_size: Union[int, str] = "5GB",
                    progress: Optional[bool] = None) -> None:
    """Writes config.json and the weights under the release's names into the folder `path`, in shards of at most
    max_shard_size planned by huggingface_hub (a tensor larger than that gets a shard of its own), with the
    standard model.safetensors.index.json; one shard is in memory at a time. `progress` shows a progress bar
    on stderr (None: for models of 1 GB and more).

    A checkpoint already in the folder stays loadable until the new one is complete: everything is written
    into a hidden staging folder inside `path` first, then moved into place by renames, the last of which (the
    index, or model.safetensors) switches the folder over; only then are the files of the old checkpoint that
    its own index names (or its model.safetensors) removed. No other file of the folder is touched: a new
    shard whose name is taken gets another name (model-alt-00001-of-00003.safetensors), so a crash during the
    switch leaves the old index with its own shards. config.json is replaced just before the switch (and not
    at all when unchanged). If writing fails (a full disk), the staging folder is removed and the folder is
    as it was."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    plan = [(release, tensor[index] if index else tensor) for release, tensor, _, index in release_tensors(model)]
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    old = checkpoint_files(path)
    split = _plan_shards(plan, limit, path, old)
    if not split.is_sharded and INDEX_FILE in old and (path / SINGLE_FILE).exists():
        raise FileExistsError(f"{path / SINGLE_FILE}: exists beside the sharded checkpoint in {path}, and the new "
                              f"single-file checkpoint would take its name; move it away or save to another folder")
    config = dataclasses.replace(model.config, extra=dict(model.config.extra),
                                 torch_dtype=str(model.dtype).replace("torch.", ""))
    stage = path / f".save-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        _write_stage(stage, dict(plan), split, config, progress, path.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
    _switch_over(stage, path, split, old)
    model.config.torch_dtype = config.torch_dtype


def _plan_shards(plan, limit: int, path: Path, old: set[str]):
    """huggingface_hub's shard plan (meta tensors carry the shapes and dtypes), under names that no file of the
    folder has unless it is the single model.safetensors that the new checkpoint replaces in one rename."""
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {release: torch.empty(part.shape, dtype=part.dtype, device="meta") for release, part in plan}
    for pattern in SHARD_PATTERNS:
        split = split_torch_state_dict_into_shards(meta, filename_pattern=pattern, max_shard_size=limit)
        if not split.is_sharded or not any((path / name).exists() for name in split.filename_to_tensors):
            return split
    taken = [name for name in split.filename_to_tensors if (path / name).exists()]
    raise FileExistsError(f"{path / taken[0]}: exists under both shard naming patterns {SHARD_PATTERNS}; move one "
                          f"of the two sets of files away or save to another folder")


def _write_stage(stage: Path, parts: dict, split, config: LLaDA2Config, progress, name: str) -> None:
    expected = sum(p.numel() * p.element_size() for p in parts.values())
    show = progress if progress is not None else expected >= PROGRESS_BYTES
    with tqdm(total=expected, unit="B", unit_scale=True, desc=f"saving {name}", disable=not show) as bar:
        for file, names in split.filename_to_tensors.items():
            shard = {n: parts[n].detach().to("cpu").contiguous().clone() for n in names}
            save_file(shard, stage / file, metadata={"format": "pt"})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
            del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (stage / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save(stage / "config.json")
    for file in stage.iterdir():
        _fsync(file)
    _fsync(stage)


def _switch_over(stage: Path, path: Path, split, old: set[str]) -> None:
    """Moves the staged checkpoint into `path` (see save_pretrained), then removes what only the old one used."""
    commit = INDEX_FILE if split.is_sharded else SINGLE_FILE
    for file in split.filename_to_tensors:
        if file != commit:
            os.rename(stage / file, path / file)
    new_config, config = stage / "config.json", path / "config.json"
    if config.is_file() and config.read_bytes() == new_config.read_bytes():
        new_config.unlink()
    else:
        os.replace(new_config, config)
    if commit == SINGLE_FILE and INDEX_FILE in old:
        os.rename(stage / SINGLE_FILE, path / SINGLE_FILE)
        (path / INDEX_FILE).unlink()                  # the loader reads model.safetensors from here on
    else:
        os.replace(stage / commit, path / commit)
    _fsync(path)
    for file in old - set(split.filename_to_tensors) - {commit}:
        (path / file).unlink(missing_ok=True)
    stage.rmdir()
    _fsync(path)
