"""Tensor- and expert-parallel inference on torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

    torch.distributed.init_process_group()            # in each of N processes started by torchrun
    model = llada_engine.load_model(path, parallel="tp")   # each rank reads only its slices of the checkpoint
    llada_engine.generate(model, prompts)             # unchanged: every rank gets the same tokens

    plan.py         which part of each parameter a rank holds (heads, columns/rows, experts, vocabulary rows)
    shard.py        parallelize(model): the plan applied to a model in place, with its collectives
    layers.py       the vocabulary-parallel embedding, the expert-parallel experts, the output hooks
    collectives.py  all-reduce and all-gather over the group
    loading.py      load_sharded: a checkpoint read slice by slice into the sharded model
    launch.py       the process group for the CLI and the benchmarks under torchrun
    lockstep.py     Lockstep: rank 0's engine steps mirrored on the other ranks (serve --parallel tp)
"""
from .collectives import require_group
from .launch import is_main, start, stop
from .loading import load_sharded
from .lockstep import Lockstep
from .plan import Shard, check_divisible, shard_plan
from .shard import TensorParallel, TensorParallelModel, parallelize, parameter_bytes

PARALLEL = ("tp",)

__all__ = ["PARALLEL", "Shard", "TensorParallel", "TensorParallelModel", "Lockstep", "check_divisible", "is_main",
           "load_sharded", "parallelize", "parameter_bytes", "require_group", "shard_plan", "start", "stop"]
