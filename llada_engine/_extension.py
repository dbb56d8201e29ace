"""Loads the native extension llada_engine._C, which registers the `torch.ops.llada` kernels.

A source tree that was never built still imports: `kernels_available()` is then False and calling a
kernel raises an error saying how to build it.
"""
import torch

from .version import __version__

try:
    import llada_engine._C as _C  # (not `from . import _C`, whose error on a missing file blames a circular import)
    _IMPORT_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = error


def kernels_available() -> bool:
    """True when the compiled kernels (torch.ops.llada.*) are loaded."""
    return _C is not None


def require_kernels(what: str) -> None:
    """Raises a RuntimeError naming `what` when the compiled kernels are missing."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the compiled kernels of llada_engine, but llada_engine._C did not import "
            f"({_IMPORT_ERROR}). Build them with `pip install --no-build-isolation .`, or use the "
            f"pure-PyTorch reference (the *_ref functions in llada_engine.ops)."
        )


def build_info() -> dict:
    """What the native extension was built with, and what this process runs on."""
    if _C is not None:
        info = dict(_C.build_info())
    else:
        info = {"version": __version__, "torch_version": None, "cuda_kernels": False, "cuda_archs": "",
                "cuda_version": "", "cutlass_version": "", "import_error": str(_IMPORT_ERROR)}
    info["native_extension"] = _C is not None
    info["runtime_torch_version"] = torch.__version__
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info
