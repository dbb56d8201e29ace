"""Gaussian noise on the input embeddings of MASK tokens (the LLaDA2.0 paper's remedy for the MASK embedding,
which an AR checkpoint never trained): a forward hook on the embedding table, on for the first steps only.

    with embedding_noise(model, mask_id=..., noise=std * randn(M, H)): loss = ...

Row m of `noise` [M, H] is added to the embedding of the m-th MASK token of the model's input, in input
order. The trainer draws the rows per packed row from (seed, step, row), so the noise, like the masks, does
not depend on how many processes share the batch.
"""
import contextlib

import torch


@contextlib.contextmanager
def embedding_noise(model, *, mask_id: int, noise: torch.Tensor):
    """Adds `noise` [M, H] to the embeddings of the M MASK input tokens of `model` (an LLaDA2Model) inside
    the block."""
    def hook(module, inputs, output):
        where = (inputs[0] == mask_id).nonzero().squeeze(1)                          # [M]
        if len(where) != len(noise):
            raise ValueError(f"embedding noise: the input holds {len(where)} MASK tokens but {len(noise)} were "
                             f"masked (does the data itself contain the MASK token {mask_id}?)")
        return output.index_add(0, where, noise.to(output))

    handle = model.model.word_embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
