"""MoE load balancing during training, as LLaDA2.0's MoE models are trained (DeepSeek-V3's auxiliary-loss-free
balancing and its sequence-wise balance loss), and the expert-load statistics.

    layers = moe_layers(model)                 [(layer index, MoE)], routing kept by each forward
    counts = routed_counts(layers)             float [n, E]: routed slots per expert in the last forward
    balance_loss(layers, cu_seqlens)           sum over sequences and layers of sum_i f_i P_i (a numerator:
                                               the trainer divides by the sequences of the global batch)
    update_expert_bias(layers, counts, rate)   expert_bias_i += rate * sign(mean load - load_i)
    load_stats(layers, counts)                 per layer: largest share, unused experts, coefficient of variation

The counts are summed over every micro-batch of every process before the update, so each process moves its
biases by the same global loads. In a sequence of T tokens with k experts per token out of E,
f_i = E / (k T) x (tokens routed to i) and P_i = mean over its tokens of the sigmoid score of i normalised
over all experts; only P carries a gradient (to the router's weight). n = MoE layers.
"""
import torch

from ..model.modules import MoE


def moe_layers(model) -> list[tuple[int, MoE]]:
    """The MoE layers of `model` (an LLaDA2Model), set to keep their last routing."""
    layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    for _, moe in layers:
        moe.keep_routing = True
    return layers


def clear_routing(layers) -> None:
    for _, moe in layers:
        moe.last_routing = None


def routed_counts(layers) -> torch.Tensor:
    counts = []
    for _, moe in layers:
        _, topk_ids = moe.last_routing                                             # [T, k]
        E = moe.gate.expert_bias.numel()
        counts.append(torch.bincount(topk_ids.reshape(-1).long(), minlength=E).double())
    return torch.stack(counts)                                                     # [n, E]


def balance_loss(layers, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """sum over the sequences of the last forward (cu_seqlens int32 [S + 1] of that call) and over the layers
    of sum_i f_i P_i."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                           # [S]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)  # [T]
    total = torch.zeros((), device=cu_seqlens.device)
    for _, moe in layers:
        logits, topk_ids = moe.last_routing                                        # [T, E], [T, k]
        T, E = logits.shape
        k = topk_ids.shape[1]
        scores = torch.sigmoid(logits)
        scores = scores / scores.sum(-1, keepdim=True)                             # [T, E]
        p = torch.zeros(len(lengths), E, device=logits.device).index_add(0, seq, scores)        # [S, E]
        f = torch.zeros(len(lengths), E, device=logits.device)
        f.index_put_((seq.repeat_interleave(k), topk_ids.reshape(-1).long()), torch.ones(T * k, device=f.device),
                     accumulate=True)                                              # [S, E] routed counts
        n = lengths.clamp(min=1).float()[:, None]
        total = total + ((f * E / (k * n)) * (p / n)).sum()
    return total


@torch.no_grad()
def update_expert_bias(layers, counts: torch.Tensor, rate: float) -> None:
    for (_, moe), load in zip(layers, counts):
        bias = moe.gate.expert_bias
        bias += rate * torch.sign(load.mean() - load).to(bias)


def load_stats(layers, counts: torch.Tensor) -> dict:
    """{layer index: {"max_share", "unused", "cv"}} of the routed counts [n, E]."""
    out = {}
    for (index, _), load in zip(layers, counts.cpu()):
        mean = load.mean().item()
        out[str(index)] = {"max_share": load.max().item() / max(load.sum().item(), 1.0),
                           "unused": int((load == 0).sum()),
                           "cv": load.std(unbiased=False).item() / mean if mean else 0.0}
    return out


def worst_layer(stats: dict) -> str:
    """The layer with the largest coefficient of variation, for a progress bar."""
    index, s = max(stats.items(), key=lambda item: item[1]["cv"])
    return f"L{index} max {s['max_share']:.0%} unused {s['unused']}"
