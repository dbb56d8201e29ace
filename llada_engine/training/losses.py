"""The training objectives on a packed batch (docs/ARCHITECTURE.md, Training). LLaDA2 predicts a token at its
own position for the diffusion objectives; `ar` predicts token i + 1 from position i.

    ar    causal next-token cross-entropy (block_causal, block_size 1), per trained target
    bdlm  [x_t | x_0] of every sequence through the model under mask="bd3"; cross-entropy at the masked
          tokens of x_t, weighted 1/t and divided by the trainable tokens (elbo) or divided by the masked
          tokens (mean)
    mdlm  x_t alone under block_causal with one block covering the sequence; weighted as bdlm
    cap   + cap_lambda x the mean entropy of the predicted distribution at masked tokens predicted right
    dpo   -log sigmoid(beta [(B(y_w) - B_ref(y_w)) - (B(y_l) - B_ref(y_l))]), B the one-sample bd3 ELBO of a
          sequence (-sum over its masked tokens of CE / t); the reference sees the same x_t, without grad

A loss is a sum of terms coefficient x numerator / count (objective_terms -> Terms): the numerators are sums
over the tokens, sequences or pairs of a batch, the counts are sums over the whole global batch (every
micro-batch of every process), so that the loss of the global batch is the sum of its micro-batches' terms
whatever their number. The counts a batch shows before any forward come from batch_counts; the one only the
forward knows (CAP's right predictions) comes with the terms. `objective_loss` is the one-batch form: counts
summed over the processes by `total` (the identity on one process).
Metrics are sums too (ce: summed cross-entropy, masked / targets / pairs: counts, DPO rewards); `summarize`
turns their global sums into the logged numbers. T = tokens of the batch, S = its sequences, V = vocabulary.
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


@dataclasses.dataclass
class Terms:
    """loss = sum over parts of coefficient x numerator / counts[name], counts over the global batch."""
    parts: list                                              # (coefficient, numerator (a 0-dim tensor), count name)
    metrics: dict                                            # sums over this batch, to log
    counts: dict = dataclasses.field(default_factory=dict)   # counts only the forward knows


def ar_targets(batch: Batch) -> torch.Tensor:
    """bool [T - 1]: position i predicts token i + 1 (trained, and in the same sequence)."""
    seq = batch.seq
    return batch.trainable[1:] & (seq[1:] == seq[:-1])


def batch_counts(batch: Batch) -> dict:
    """The counts of a batch known before its forward (float 0-dim tensors)."""
    pairs = (batch.roles == CHOSEN).sum()
    return {"trainable": batch.trainable.sum().float(), "masked": batch.masked.sum().float(),
            "targets": ar_targets(batch).sum().float(), "pairs": pairs.float(),
            "sequences": torch.tensor(float(len(batch.roles)), device=batch.roles.device)}


def combine(terms: Terms, counts: dict) -> torch.Tensor:
    """The loss of `terms` against global `counts` (a count of 0 divides as 1: its numerator is 0 too)."""
    return sum(c * num / counts[name].clamp(min=1.0) for c, num, name in terms.parts)


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


def diffusion_terms(model, batch: Batch, phase: Phase) -> Terms:
    """bdlm or mdlm, plus CAP when phase.cap_lambda > 0."""
    logits = diffusion_logits(model, batch, phase)                                  # [M, V]
    target = batch.x0[batch.masked]
    ce = F.cross_entropy(logits, target, reduction="none")                          # [M]
    if phase.weighting == "elbo":
        parts = [(1.0, (ce / batch.t[batch.masked]).sum(), "trainable")]
    else:
        parts = [(1.0, ce.sum(), "masked")]
    terms = Terms(parts, {"ce": ce.detach().sum(), "masked": batch.masked.sum()})
    if phase.cap_lambda:
        entropy, right = cap_entropy(logits, target)
        terms.parts.append((phase.cap_lambda, entropy, "right"))
        terms.counts["right"] = right
        terms.metrics.update(cap_entropy=entropy.detach(), right=right)
    return terms


def cap_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed entropy of softmax(logits) [M, V] over the rows whose argmax equals target [M], and their
    number."""
    right = logits.detach().argmax(-1) == target
    logp = F.log_softmax(logits[right], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy.sum(), right.sum().float()


def ar_terms(model, batch: Batch, phase: Phase) -> Terms:
    valid = ar_targets(batch)
    logits = model(batch.x0, batch.cu_seqlens, block_size=1, mask="block_causal",
                   logits_at=valid.nonzero().squeeze(1))                            # [N, V]
    ce = F.cross_entropy(logits, batch.x0[1:][valid], reduction="none")
    return Terms([(1.0, ce.sum(), "targets")], {"ce": ce.detach().sum(), "targets": valid.sum()})


def sequence_elbo(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One-sample ELBO of each sequence [S] from the logits of the masked tokens [M, V]: -sum over its masked
    tokens of CE / t."""
    m = batch.masked
    ce = F.cross_entropy(logits, batch.x0[m], reduction="none") / batch.t[m]
    return -torch.zeros(len(batch.roles), dtype=ce.dtype, device=ce.device).index_add(0, batch.seq[m], ce)


def dpo_terms(model, batch: Batch, phase: Phase, reference) -> Terms:
    chosen, rejected = (batch.roles == CHOSEN).nonzero().squeeze(1), (batch.roles == REJECTED).nonzero().squeeze(1)
    if len(chosen) != len(rejected) or not torch.equal(chosen + 1, rejected):
        raise ValueError("dpo: every chosen sequence must be followed by its rejected sequence in the batch")
    policy = sequence_elbo(bd3_logits(model, batch, phase.block_size), batch)       # [S]
    with torch.no_grad():
        ref = sequence_elbo(bd3_logits(reference, batch, phase.block_size), batch)
    reward = phase.beta * (policy - ref)                                            # [S] implicit rewards
    margin = reward[chosen] - reward[rejected]
    metrics = {"reward_chosen": reward[chosen].detach().sum(), "reward_rejected": reward[rejected].detach().sum(),
               "reward_correct": (margin.detach() > 0).sum(), "pairs": torch.tensor(len(chosen))}
    return Terms([(1.0, -F.logsigmoid(margin).sum(), "pairs")], metrics)


def objective_terms(model, batch: Batch, phase: Phase, reference=None) -> Terms:
    if phase.objective == "ar":
        return ar_terms(model, batch, phase)
    if phase.objective == "dpo":
        return dpo_terms(model, batch, phase, reference)
    return diffusion_terms(model, batch, phase)


def objective_loss(model, batch: Batch, phase: Phase, total: Total, reference=None) -> tuple[torch.Tensor, dict]:
    """The loss of one batch, its counts summed over the processes by `total`, and its metrics."""
    terms = objective_terms(model, batch, phase, reference)
    counts = {name: total(value) for name, value in dict(batch_counts(batch), **terms.counts).items()}
    return combine(terms, counts), terms.metrics


def summarize(metrics: dict) -> dict:
    """The logged numbers of a step's metrics, summed over the global batch."""
    out = {k: float(v) for k, v in metrics.items() if k in ("ce", "masked", "targets", "pairs")}
    if "right" in metrics:
        out["cap_entropy"] = float(metrics["cap_entropy"]) / max(float(metrics["right"]), 1.0)
    if "pairs" in metrics:
        pairs = max(float(metrics["pairs"]), 1.0)
        chosen, rejected = float(metrics["reward_chosen"]) / pairs, float(metrics["reward_rejected"]) / pairs
        out.update(reward_accuracy=float(metrics["reward_correct"]) / pairs, reward_chosen=chosen,
                   reward_rejected=rejected, reward_margin=chosen - rejected)
    return out
