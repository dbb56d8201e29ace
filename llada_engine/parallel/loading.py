"""Loading a checkpoint tensor-parallel: each rank reads from the safetensors only its own slices.

    model = load_sharded(path, group=None, dtype=None, device=None, backend="kernels", progress=None)

`load_model(path, parallel="tp")` calls this. The model is built on the meta device with the full config,
sharded there (shard.py), given storage for the rank's parts only, and filled through safetensors'
`get_slice`: a tensor split along a dim is read as those rows or columns, an expert of another rank is not
read at all, a row-parallel bias is read on rank 0 only. The release names and the mapping of the per-expert
tensors onto the stacked experts are checkpoint.py's (`release_tensors`), as is every check of the files.
"""
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from ..model.checkpoint import (_DTYPES, PROGRESS_BYTES, _materialize, _model_dtypes, _unreadable, _weight_files,
                                release_tensors)
from ..model.config import LLaDA2Config
from ..model.hub import resolve_checkpoint
from ..model.model import LLaDA2Model
from .collectives import check_device, require_group
from .shard import parallelize


def load_sharded(path: Union[str, Path], *, group: Optional[dist.ProcessGroup] = None,
                 dtype: Optional[torch.dtype] = None, device=None, backend: str = "kernels",
                 progress: Optional[bool] = None) -> LLaDA2Model:
    group = require_group(group)
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    config = LLaDA2Config.from_file(path / "config.json")
    files = _weight_files(path)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    check_device(group, device)
    with torch.device("meta"):
        model = LLaDA2Model(config, backend=backend)
    entries = list(release_tensors(model))                      # (release, full tensor, ours, index), full shapes
    full_shapes = {release: tuple(tensor[index].shape if index else tensor.shape)
                   for release, tensor, _, index in entries}
    unexpected = sorted(set(files) - set(full_shapes))
    if unexpected:
        raise ValueError(f"{path}: tensors not in a LLaDA2.0 model of this config: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    parallelize(model, group)
    plan = model.parallel.plan

    handles = {}

    def open_slice(release: str):
        if release not in files:
            raise ValueError(f"{path}: checkpoint lacks tensor {release}")
        file = files[release]
        if file not in handles:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing shard")
            try:
                handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
                raise _unreadable(file, error) from None
        part = handles[file].get_slice(release)
        if tuple(part.get_shape()) != full_shapes[release]:
            raise ValueError(f"{file}: tensor {release} has shape {list(part.get_shape())}, "
                             f"expected {list(full_shapes[release])}")
        return part

    try:
        stored = {}
        for release, _, _, _ in entries:        # every rank checks every tensor's presence, shape and dtype
            stored[release] = open_slice(release).get_dtype()
            if stored[release] not in _DTYPES:
                raise ValueError(f"{files[release]}: tensor {release} is stored as {stored[release]}, expected a "
                                 f"floating dtype ({', '.join(_DTYPES)})")
        _materialize(model, _model_dtypes(model, entries, stored, dtype), device)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        reads = list(_rank_reads(entries, plan, params))
        total = sum(target.numel() * target.element_size() for _, _, target in reads)
        show = (progress if progress is not None else total >= PROGRESS_BYTES) and dist.get_rank(group) == 0
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not show)
        with torch.no_grad(), bar:
            for name, shard in plan.items():
                if shard.zero:
                    params[name].zero_()
            for release, selection, target in reads:
                part = open_slice(release)
                try:
                    tensor = part[selection] if selection else part[:]
                except Exception as error:
                    raise ValueError(f"{files[release]}: cannot read tensor {release} ({error})") from None
                target.copy_(tensor)
                bar.update(target.numel() * target.element_size())
                del tensor
    finally:
        handles.clear()
    return model.eval()


def _rank_reads(entries, plan, params):
    """(release name, the slices of it to read or (), the local tensor they go to) for this rank."""
    for release, _, ours, index in entries:
        local = params[ours]
        shard = plan.get(ours)
        if shard is None:
            yield release, (), local[index] if index else local
        elif shard.zero:
            continue
        elif index:                              # one expert of a stacked tensor, split by expert (dim 0)
            at = shard.locate(index[0])
            if at is not None:
                yield release, (), local[(at,) + tuple(index[1:])]
        else:
            for start, stop, offset in shard.pieces():
                selection = (slice(None),) * shard.dim + (slice(start, stop),)
                yield release, selection, local.narrow(shard.dim, offset, stop - start)
