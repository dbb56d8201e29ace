"""Gaussian noise on the input embeddings of MASK tokens (the LLaDA2.0 paper's remedy for the MASK embedding,
which an AR checkpoint never trained): a forward hook on the embedding table, on for the first steps only.

    with embedding_noise(model, mask_id=..., std=0.1, generator=g): loss = ...
"""
import contextlib

import torch


@contextlib.contextmanager
def embedding_noise(model, *, mask_id: int, std: float, generator: torch.Generator):
    """Adds N(0, std^2) to the embedding of every MASK input token of `model` (an LLaDA2Model) inside the block."""
    def hook(module, inputs, output):
        ids = inputs[0]                                                              # [T]
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)
        return output + std * noise * (ids == mask_id).unsqueeze(-1).to(output.dtype)

    handle = model.model.word_embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
