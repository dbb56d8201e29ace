"""Scale-out through torch.distributed only: a process group when torchrun started us, DDP or FSDP2 around
the model, and the global sum that makes a loss independent of the number of processes.

    env = setup("auto")                    # rank, world size, device (gloo on CPU, nccl on CUDA)
    forward_model = wrap(model, "ddp" | "fsdp", env, compute_dtype)
    with gradient_sync(forward_model, sync): loss.backward()   # sync=False: no reduction (micro-batches)
    env.total(count)                       # sum over processes (a new tensor; the identity on one process)

One process (no torchrun, or WORLD_SIZE=1) runs without a process group. Under FSDP2 each decoder layer and
then the whole model are sharded with torch.distributed.fsdp.fully_shard; the model is the wrapper; with a
compute dtype its MixedPrecisionPolicy gathers the parameters in it and reduces the gradients in fp32.
"""
import contextlib
import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def total(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x


def setup(device: str = "auto") -> DistEnv:
    """device: "auto" (CUDA when torch sees a GPU), "cuda" or "cpu"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is cuda, but torch sees no CUDA device")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistEnv(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def teardown(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, parallel: str, env: DistEnv,
         compute_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    if env.world == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .precision import fsdp_policy

        policy = fsdp_policy(compute_dtype) if compute_dtype is not None else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for a backward that reduces the gradients over the processes only when `sync` (DDP: no_sync;
    FSDP2: set_requires_gradient_sync); one process never reduces."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
