"""Argument checks that the Python side of the ops shares (the C++ twins live in bindings/validation.h):
the public wrappers check that their tensors are tensors, the fake (meta) implementations what they read.

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


def check_tensors(op: str, **tensors) -> None:
    """Every argument given is a tensor; TypeError naming the first that is not (None included)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def check_dims(op: str, **tensors: tuple[torch.Tensor, str]) -> None:
    """name=(tensor, layout): each tensor a tensor with as many dimensions as its layout names (e.g.
    "[T, H]"); the shape checks of the fake implementations, which see no values."""
    for name, (t, layout) in tensors.items():
        check_tensors(op, **{name: t})
        if t.dim() != layout.count(",") + 1:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {list(t.shape)}")


def check_int32_range(op: str, name: str, value: int, low: int = 0) -> None:
    """An int argument that the kernels hold in int32 (the twin of bindings/validation.h's)."""
    if not low <= value <= INT32_MAX:
        raise ValueError(f"{op}: {name} must be in [{low}, 2^31 - 1], got {value}")


def _tensor_arguments(schema) -> list[tuple[str, bool]]:
    """(name, optional) of the Tensor arguments of an op schema."""
    kinds = {"Tensor": False, "Optional[Tensor]": True}
    return [(a.name, kinds[str(a.type)]) for a in schema.arguments if str(a.type) in kinds]


def register_no_kernel_errors(namespace: str = "llada") -> None:
    """For every op of `namespace`: a call that no kernel serves (every tensor argument None, or tensors on a
    device this build has no kernel for) raises an error naming the argument, not the dispatcher's
    "no fallback function is registered" / "Could not run ... with arguments from the X backend". Kernels
    registered for a device (CPU, CUDA, the fake one for Meta) take precedence over this one."""
    for qualname in torch._C._dispatch_get_all_op_names():
        if not qualname.startswith(namespace + "::"):
            continue
        op_name = qualname.split("::", 1)[1]
        packet = getattr(getattr(torch.ops, namespace), op_name.split(".")[0])
        overload = getattr(packet, op_name.split(".")[1] if "." in op_name else "default")
        schema = overload._schema
        names = [a.name for a in schema.arguments]

        def no_kernel(*args, _op=op_name.split(".")[0], _tensors=_tensor_arguments(schema), _names=names,
                      **kwargs):
            given = {**dict(zip(_names, args)), **kwargs}
            for name, optional in _tensors:
                if given.get(name) is None and not optional:
                    raise TypeError(f"{_op}: {name} must be a tensor, got None")
            name, t = next((n, given[n]) for n, _ in _tensors if isinstance(given.get(n), torch.Tensor))
            raise NotImplementedError(f"{_op}: no kernel for {name} on {t.device.type} in this build of "
                                      f"llada_engine (see llada_engine.build_info())")

        torch.library.impl(qualname, "CompositeExplicitAutograd")(no_kernel)
