"""The collectives of tensor-parallel inference, over one torch.distributed process group (NCCL on GPUs,
gloo on CPUs), each the identity on a group of one.

    group = require_group(group)          # the given group, or the default one; a clear error without one
    check_device(group, device)           # NCCL reduces GPU tensors only
    all_reduce_(x, group)                 # x summed over ranks, in place
    gather_last_dim(x, group)             # [..., n] on each rank -> [..., world * n], rank order
    least(value, group, device)           # the smallest of the ranks' ints (a host value all must agree on)
"""
from typing import Optional

import torch
import torch.distributed as dist


def require_group(group: Optional[dist.ProcessGroup] = None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("parallel='tp' needs an initialised torch.distributed process group: start the "
                           "processes with torchrun and call torch.distributed.init_process_group() first "
                           "(the CLI's --parallel tp does)")
    return group if group is not None else dist.group.WORLD


def check_device(group: dist.ProcessGroup, device: torch.device) -> None:
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"parallel='tp': the process group's backend is nccl, which needs the model on a GPU, "
                         f"got device={str(device)!r} (pass device='cuda', or use a gloo group on the CPU)")


def all_reduce_(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n).contiguous()                                     # [R, n]
    out = rows.new_empty((world * rows.shape[0], n))                         # [world * R, n]
    dist.all_gather_single(out, rows, group=group)
    return out.view(world, rows.shape[0], n).transpose(0, 1).reshape(*lead, world * n)


def least(value: int, group: dist.ProcessGroup, device: torch.device) -> int:
    if dist.get_world_size(group) == 1:
        return value
    x = torch.tensor([value], dtype=torch.int64, device=device)      # NCCL reduces device tensors only
    dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
    return int(x.item())
