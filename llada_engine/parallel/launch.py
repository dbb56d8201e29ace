"""The process group of a command started by torchrun: what `--parallel tp` of the CLI and of
benchmarks/decode.py sets up.

    device = start(device)     # init_process_group (nccl for CUDA, gloo for the CPU); CUDA: cuda:LOCAL_RANK
    is_main()                  # rank 0 (or no process group): the process that prints
    stop()                     # destroy_process_group
"""
import os
from typing import Optional

import torch
import torch.distributed as dist


def start(device: Optional[str] = None) -> torch.device:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--parallel tp runs under torchrun: torchrun --nproc_per_node N -m llada_engine ...")
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
