"""Argument checks that the Python side of the ops shares (the C++ twins live in bindings/validation.h).

The fake (meta) implementations check devices as the kernels do: a tensor on the meta device among real
ones dispatches to the fake rather than to a kernel, and must be refused there, by name, instead of
yielding uninitialised memory.
"""
from typing import Optional

import torch

INT32_MAX = 2**31 - 1


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Every tensor given (None skipped) on the device of the first one; ValueError naming the first that is not."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def check_int_values(op: str, name: str, t: torch.Tensor, low: int, high: int, bounds: str = "") -> None:
    """ValueError naming the first value of the integer tensor t outside [low, high] (read on the host);
    `bounds` says the range in the op's terms (default "[low, high]")."""
    outside = (t < low) | (t > high)
    if outside.any():
        index = [int(i) for i in outside.nonzero()[0]]
        raise ValueError(f"{op}: {name}{index} = {int(t[tuple(index)])} is outside {bounds or f'[{low}, {high}]'}")
