"""Training objectives on a packed batch (docs/ARCHITECTURE.md, Training). LLaDA2 predicts a token at its own position
for the diffusion objectives; `ar` predicts token i + 1 from position i.

    ar    causal next-token cross-entropy (block_causal, block_size 1), per trained target
    bdlm  [x_t | x_0] of every sequence through the model under mask="bd3"; cross-entropy at the masked
          tokens of x_t, weighted 1/t and divided by the trainable tokens (elbo) or divided by the masked
          tokens (mean)
    mdlm  x_t alone under block_causal with one block covering the sequence; weighted as bdlm
    cap   + cap_lambda x the mean entropy of the predicted distribution at masked tokens predicted right
    dpo   -log sigmoid(beta [(B(y_w) - B_ref(y_w)) - (B(y_l) - B_ref(y_l))]), B the one-sample bd3 ELBO of a
          sequence (-sum over its masked tokens of CE / t); the reference sees the same x_t, without grad

Each returns (loss, extras): extras are scalars whose sum over the processes is logged (ce: summed
cross-entropy, masked / targets / pairs: counts, cap_entropy: the CAP term, margin: summed DPO margins).
`total(x)` sums a count over every process (the identity on one process), so each loss is a sum over the
global batch divided by a global count: the same number on one process or many for the same global batch.
T = tokens of the batch, S = its sequences, V = vocabulary.
"""
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .data import CHOSEN, PADDING, REJECTED, Row
from .noise import Noisy
from .schedule import Phase

Total = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Batch:
    x0: torch.Tensor          # int64 [T]
    xt: torch.Tensor          # int64 [T]
    masked: torch.Tensor      # bool [T]
    t: torch.Tensor           # fp32 [T]
    trainable: torch.Tensor   # bool [T]
    cu_seqlens: torch.Tensor  # int32 [S + 1]
    roles: torch.Tensor       # int64 [S]

    @property
    def seq(self) -> torch.Tensor:
        """int64 [T]: the sequence of each token."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def collate(pairs: list[tuple[Row, Noisy]]) -> Batch:
    """One packed batch of the rows' sequences, padding sequences left out."""
    parts, lengths, roles = [], [], []
    for row, noisy in pairs:
        keep = torch.repeat_interleave(torch.tensor([r != PADDING for r in row.roles]), torch.tensor(row.lengths))
        parts.append((noisy.x0[keep], noisy.xt[keep], noisy.masked[keep], noisy.t[keep], noisy.trainable[keep]))
        lengths += [n for n, r in zip(row.lengths, row.roles) if r != PADDING]
        roles += [r for r in row.roles if r != PADDING]
    x0, xt, masked, t, train = (torch.cat(p) for p in zip(*parts))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return Batch(x0, xt, masked, t, train, cu, torch.tensor(roles))


def _safe(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=1.0)


def bd3_logits(model, batch: Batch, block_size: int) -> torch.Tensor:
    """Logits [M, V] of the masked tokens of x_t, [x_t | x_0] of every sequence through the model under
    mask="bd3"."""
    seq = batch.seq
    starts = batch.cu_seqlens[:-1].long()
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    noisy_at = torch.arange(len(seq), device=seq.device) + starts[seq]                 # [T] in the doubled layout
    both = torch.empty(2 * len(seq), dtype=torch.int64, device=seq.device)
    both[noisy_at] = batch.xt
    both[noisy_at + lengths[seq]] = batch.x0
    return model(both, batch.cu_seqlens * 2, block_size=block_size, mask="bd3", logits_at=noisy_at[batch.masked])


def diffusion_logits(model, batch: Batch, phase: Phase) -> torch.Tensor:
    """Logits [M, V] of the masked tokens under the phase's objective (bdlm or mdlm)."""
    if phase.objective == "mdlm":
        return model(batch.xt, batch.cu_seqlens, block_size=phase.block_size, mask="block_causal",
                     logits_at=batch.masked.nonzero().squeeze(1))
    return bd3_logits(model, batch, phase.block_size)


def diffusion_loss(model, batch: Batch, phase: Phase, total: Total) -> tuple[torch.Tensor, dict]:
    """bdlm or mdlm, plus CAP when phase.cap_lambda > 0."""
    logits = diffusion_logits(model, batch, phase)                                  # [M, V]
    target = batch.x0[batch.masked]
    ce = F.cross_entropy(logits, target, reduction="none")                          # [M]
    if phase.weighting == "elbo":
        loss = (ce / batch.t[batch.masked]).sum() / _safe(total(batch.trainable.sum().float()))
    else:
        loss = ce.sum() / _safe(total(batch.masked.sum().float()))
    metrics = {"ce": ce.detach().sum(), "masked": batch.masked.sum()}
    if phase.cap_lambda:
        cap = cap_entropy(logits, target, total)
        metrics["cap_entropy"] = cap.detach()
        loss = loss + phase.cap_lambda * cap
    return loss, metrics


def cap_entropy(logits: torch.Tensor, target: torch.Tensor, total: Total) -> torch.Tensor:
    """Mean entropy of softmax(logits) [M, V] over the rows whose argmax equals target [M]."""
    right = logits.detach().argmax(-1) == target
    logp = F.log_softmax(logits[right], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy.sum() / _safe(total(right.sum().float()))


def ar_loss(model, batch: Batch, phase: Phase, total: Total) -> tuple[torch.Tensor, dict]:
    seq = batch.seq
    valid = batch.trainable[1:] & (seq[1:] == seq[:-1])                             # target i + 1 from position i
    logits = model(batch.x0, batch.cu_seqlens, block_size=1, mask="block_causal",
                   logits_at=valid.nonzero().squeeze(1))                            # [N, V]
    ce = F.cross_entropy(logits, batch.x0[1:][valid], reduction="none")
    return ce.sum() / _safe(total(valid.sum().float())), {"ce": ce.detach().sum(), "targets": valid.sum()}


def sequence_elbo(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One-sample ELBO of each sequence [S] from the logits of the masked tokens [M, V]: -sum over its masked
    tokens of CE / t."""
    m = batch.masked
    ce = F.cross_entropy(logits, batch.x0[m], reduction="none") / batch.t[m]
    return -torch.zeros(len(batch.roles), dtype=ce.dtype, device=ce.device).index_add(0, batch.seq[m], ce)


def dpo_loss(model, batch: Batch, phase: Phase, total: Total, reference) -> tuple[torch.Tensor, dict]:
    chosen, rejected = (batch.roles == CHOSEN).nonzero().squeeze(1), (batch.roles == REJECTED).nonzero().squeeze(1)
    if len(chosen) != len(rejected) or not torch.equal(chosen + 1, rejected):
        raise ValueError("dpo: every chosen sequence must be followed by its rejected sequence in the batch")
    policy = sequence_elbo(bd3_logits(model, batch, phase.block_size), batch)       # [S]
    with torch.no_grad():
        ref = sequence_elbo(bd3_logits(reference, batch, phase.block_size), batch)
    margin = phase.beta * ((policy[chosen] - ref[chosen]) - (policy[rejected] - ref[rejected]))
    loss = -F.logsigmoid(margin).sum() / _safe(total(torch.tensor(float(len(chosen)), device=margin.device)))
    return loss, {"margin": margin.detach().sum(), "pairs": torch.tensor(len(chosen))}


def objective_loss(model, batch: Batch, phase: Phase, total: Total, reference=None) -> tuple[torch.Tensor, dict]:
    if phase.objective == "ar":
        return ar_loss(model, batch, phase, total)
    if phase.objective == "dpo":
        return dpo_loss(model, batch, phase, total, reference)
    return diffusion_loss(model, batch, phase, total)
