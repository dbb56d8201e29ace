"""Mixed precision: fp32 master weights and optimizer state, the forward and backward in model.dtype.

    compute_in(model, dtype)     one process / DDP: every forward runs on casts of the fp32 parameters
    fsdp_policy(dtype)           FSDP2: parameters gathered in dtype, gradients reduced in fp32
    grad_scaler(dtype, device)   float16: a dynamic loss scale (torch.amp.GradScaler); off for other dtypes

The parameters (the masters) and AdamW's state stay fp32. Under compute_in each decoder layer's forward, and
the model's own (embeddings, final norm, lm_head), swaps its parameters for casts to `dtype` while it runs:
the model computes exactly as a model loaded in `dtype` does (the llada kernels in bf16), and autograd
brings each gradient back to its fp32 parameter in fp32, so gradients accumulate over micro-batches and DDP
all-reduces them in fp32. A checkpointed layer casts again in its recomputation. With
`model.pure_low_precision` the trainer keeps parameters and optimizer state in model.dtype instead and uses
none of this.
"""
import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _casting(forward, owned: list[tuple[nn.Module, str]], dtype: torch.dtype):
    """`forward` run with the parameters `owned` (module, name) replaced by their casts to dtype."""
    def run(*args, **kwargs):
        saved = []
        try:
            for module, name in owned:
                param = module._parameters[name]
                saved.append((module, name, param))
                module._parameters[name] = param.to(dtype)
            return forward(*args, **kwargs)
        finally:
            for module, name, param in saved:
                module._parameters[name] = param

    return run


def _parameters_of(modules) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in modules for name, p in m._parameters.items() if p is not None]


def compute_in(model, dtype: torch.dtype) -> None:
    """Makes the forward of `model` (an LLaDA2Model with fp32 parameters) compute in `dtype`."""
    layers = list(model.model.layers)
    inside = {id(m) for layer in layers for m in layer.modules()}
    for layer in layers:
        layer.forward = _casting(layer.forward, _parameters_of(layer.modules()), dtype)
    model.forward = _casting(model.forward, _parameters_of(m for m in model.modules() if id(m) not in inside), dtype)


def fsdp_policy(dtype: torch.dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def grad_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
