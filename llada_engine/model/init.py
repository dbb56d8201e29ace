"""Random initialisation of a LLaDA2.0 model, as the release's `_init_weights` does: every linear and embedding
weight (stacked experts and the router included) from N(0, std), norms at one, expert biases at zero."""
from typing import Optional

import torch

from .config import LLaDA2Config
from .model import LLaDA2Model
from .modules import RMSNorm


def random_model(config: LLaDA2Config, *, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
                 device=None, backend: str = "kernels", batch_invariant: bool = True) -> LLaDA2Model:
    """A model of `config` with freshly initialised weights (for training from scratch and benchmarks)."""
    model = LLaDA2Model(config, backend=backend, batch_invariant=batch_invariant)
    init_weights(model, seed=seed, std=std)
    return model.to(device=device, dtype=dtype)


def init_weights(model: LLaDA2Model, *, seed: int = 0, std: float = 0.02, generator: Optional[torch.Generator] = None):
    generator = generator or torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif leaf == "bias":
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.zero_()
