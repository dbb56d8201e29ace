"""Helpers every op test uses: the devices to run on, and the comparison against an fp32 reference.

Tolerances follow FlashAttention's tests: a low-precision result may be off the fp32 reference by at
most `factor` times the error the reference itself makes when run in that low precision, plus a floor.
"""
import pytest
import torch

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor = None, *,
                              factor: float = 2.0, atol: float = 1e-5, name: str = "output") -> None:
    """out within atol of the fp32 reference, or within factor x the reference's own low-precision error."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    err = max_abs_error(out, ref_fp32)
    bound = atol
    if ref_lowp is not None:
        bound = max(bound, factor * max_abs_error(ref_lowp, ref_fp32))
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


def registered_llada_ops() -> set[str]:
    """Names of every operator registered in the `llada` namespace (without the namespace)."""
    return {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("llada::")}
