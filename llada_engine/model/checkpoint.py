"""Official LLaDA2.0 checkpoints in and out: config.json + safetensors (one file, or shards with
model.safetensors.index.json) under the release's tensor names. Nothing is ever unpickled.

Loading builds the model on the meta device, gives each parameter its storage in the checkpoint's (or the
requested) dtype on the target device, and copies the tensors in one at a time, so a large checkpoint is
never held twice. The per-expert tensors `mlp.experts.E.{gate,up,down}_proj.weight` are copied into the
stacked `mlp.w13` / `mlp.w2` of their layer; saving writes them back per expert.
"""
import json
import re
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import LLaDA2Config
from .default import resolve_checkpoint
from .model import LLaDA2Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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


def _weight_files(path: Path) -> dict[str, Path]:
    """Release tensor name -> the file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index}: not a safetensors index ({error})") from None
        return {name: path / file for name, file in weight_map.items()}
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
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data_len = file.stat().st_size - 8 - header_len
        cut = [name for name, info in header.items() if name != "__metadata__" and info["data_offsets"][1] > data_len]
        if cut:
            return ValueError(f"{file}: truncated, tensor {cut[0]} ends past the end of the file")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ValueError(f"{file}: not a readable safetensors file ({error})")


def load_model(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None, device=None,
               backend: str = "kernels", progress: Optional[bool] = None,
               batch_invariant: bool = True) -> LLaDA2Model:
    """Loads an official LLaDA2.0 checkpoint (or one saved by save_pretrained) from the folder `path`;
    "default" loads the embedded default model. `progress` shows a progress bar on stderr (None: for
    checkpoints of 1 GB and more). batch_invariant=False trades the same-result-in-any-batch numerics
    for speed (LLaDA2Model)."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    config = LLaDA2Config.from_file(path / "config.json")
    files = _weight_files(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = LLaDA2Model(config, backend=backend, batch_invariant=batch_invariant)

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

        dtypes = {}
        for release, _, ours, _ in plan:
            if release not in files:
                raise ValueError(f"{path}: checkpoint lacks tensor {release}")
            if ours not in dtypes:
                file_dtype = handle(files[release]).get_slice(release).get_dtype()
                dtypes[ours] = dtype or _DTYPES.get(_safetensors_dtype_name(file_dtype), torch.float32)
        unexpected = sorted(set(files) - {release for release, *_ in plan})
        if unexpected:
            raise ValueError(f"{path}: tensors not in a LLaDA2.0 model of this config: {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        _materialize(model, dtypes, device)
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


def _safetensors_dtype_name(code: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(code, "float32")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if match is None:
        raise ValueError(f"max_shard_size must be bytes or a size like '5GB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def save_pretrained(model: LLaDA2Model, path: Union[str, Path], *, max_shard_size: Union[int, str] = "5GB",
                    progress: Optional[bool] = None) -> None:
    """Writes config.json and the weights under the release's names, in shards of at most max_shard_size
    (a single tensor larger than that gets a shard of its own). One shard is in memory at a time. `progress`
    shows a progress bar on stderr (None: for models of 1 GB and more)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    for stale in list(path.glob("model*.safetensors")) + list(path.glob(".shard-*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            temp = path / f".shard-{len(written):05d}.safetensors"
            save_file(shard, temp, metadata={"format": "pt"})
            written.append((temp, list(shard)))
            shard, size = {}, 0

    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    show = progress if progress is not None else expected >= PROGRESS_BYTES
    with tqdm(total=expected, unit="B", unit_scale=True, desc=f"saving {path.name}", disable=not show) as bar:
        for release, tensor, _, index in release_tensors(model):
            part = (tensor[index] if index else tensor).detach().to("cpu").contiguous().clone()
            nbytes = part.numel() * part.element_size()
            if shard and size + nbytes > limit:
                flush()
            shard[release] = part
            size += nbytes
            total += nbytes
            bar.update(nbytes)
        flush()
    if len(written) == 1:
        written[0][0].rename(path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, (temp, names) in enumerate(written):
            name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            temp.rename(path / name)
            weight_map.update({k: name for k in names})
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2, sort_keys=True) + "\n")
    model.config.torch_dtype = str(model.dtype).replace("torch.", "")
    model.config.save(path / "config.json")
