"""Activation memory: checkpointing of the decoder layers, and a meter of what the backward holds.

    checkpoint_layers(model, meter)   each decoder layer's forward under torch.utils.checkpoint (non-reentrant):
                                      its activations are recomputed in the backward, only its inputs are kept
    with meter: loss = ...            meter.bytes: what autograd holds for the backward after the forward

The meter counts the distinct storages autograd saves for the backward while it is open (through saved-tensor
hooks; the parameters themselves excluded, their compute-dtype casts included) plus the inputs that
checkpointed layers keep for their recomputation: the activation memory of a micro-batch, on any device.
"""
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint


class ActivationMeter:
    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[int, int] = {}
        self._hooks = None

    def hold(self, *tensors) -> None:
        """Counts `tensors` as held for the backward (while the meter is open)."""
        if self._hooks is None:
            return
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._params:
                    self._seen.setdefault(storage.data_ptr(), storage.nbytes())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.hold(t)
        return t.detach()

    def __enter__(self) -> "ActivationMeter":
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def checkpoint_layers(model, meter: Optional[ActivationMeter] = None) -> None:
    """Recomputes each decoder layer of `model` (an LLaDA2Model) in the backward."""
    for layer in model.model.layers:
        def run(*args, _forward=layer.forward):
            if meter is not None:
                meter.hold(*args)
            return checkpoint(_forward, *args, use_reentrant=False)

        layer.forward = run
