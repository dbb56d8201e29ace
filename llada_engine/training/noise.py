"""The forward (masking) process of the diffusion objectives, on one packed row (docs/ARCHITECTURE.md, Training).

    trainable(row) -> bool [L]: tokens that may be masked and trained (not a prompt, not padding)
    mask_row(row, generator, *, mask_id, t_min, t_max, band=None, complementary=False) -> list[Noisy]

Per sequence t ~ U[t_min, t_max]. Without a band each trainable token becomes MASK with probability t.
With a band [lo, hi], t is drawn inside it (U[max(t_min, lo), min(t_max, hi)]) and exactly k = round(t n) of
the n trainable tokens are masked, k kept where the realised ratio k / n lies in the band (where a whole
number allows), and t is that realised ratio.
Complementary masking returns the row twice: with the mask M and with its complement over the trainable
tokens (t -> 1 - t), so that every trainable token is masked exactly once across the pair.
L = tokens of the row, S = its sequences.
"""
import dataclasses
import math
from typing import Optional

import torch

from .data import PADDING, Row


@dataclasses.dataclass
class Noisy:
    x0: torch.Tensor         # int64 [L] clean tokens
    xt: torch.Tensor         # int64 [L] with MASK at the masked positions
    masked: torch.Tensor     # bool [L]
    t: torch.Tensor          # fp32 [L] the mask ratio of each token's sequence
    trainable: torch.Tensor  # bool [L]


def sequence_index(lengths: list[int]) -> torch.Tensor:
    """int64 [L]: the sequence of each token."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def trainable(row: Row) -> torch.Tensor:
    seq = sequence_index(row.lengths)
    starts = torch.tensor([0] + row.lengths[:-1]).cumsum(0)
    pos = torch.arange(len(row.tokens)) - starts[seq]
    prompt = torch.tensor(row.prompt_lens)[seq]
    padding = torch.tensor(row.roles)[seq] == PADDING
    return (pos >= prompt) & ~padding


def mask_row(row: Row, generator: torch.Generator, *, mask_id: int, t_min: float, t_max: float,
             band: Optional[tuple[float, float]] = None, complementary: bool = False) -> list[Noisy]:
    x0 = torch.from_numpy(row.tokens)
    train = trainable(row)
    seq = sequence_index(row.lengths)
    S = len(row.lengths)
    if band is not None:
        if max(t_min, band[0]) > min(t_max, band[1]):
            raise ValueError(f"mask_band {band} does not meet the mask ratio range [{t_min}, {t_max}]")
        t_min, t_max = max(t_min, band[0]), min(t_max, band[1])
    t_seq = t_min + (t_max - t_min) * torch.rand(S, generator=generator)         # [S]
    if band is None:
        masked = train & (torch.rand(len(x0), generator=generator) < t_seq[seq])
    else:
        lo, hi = band
        masked = torch.zeros(len(x0), dtype=torch.bool)
        starts = [0] + torch.tensor(row.lengths).cumsum(0).tolist()
        for s in range(S):
            where = train[starts[s]:starts[s + 1]].nonzero().squeeze(1) + starts[s]
            n = len(where)
            if n == 0:
                continue
            k = round(float(t_seq[s]) * n)
            k_lo, k_hi = math.ceil(lo * n - 1e-9), math.floor(hi * n + 1e-9)
            if k_lo <= k_hi:
                k = min(max(k, k_lo), k_hi)
            chosen = where[torch.randperm(n, generator=generator)[:k]]
            masked[chosen] = True
            t_seq[s] = k / n
    noisy = [_noisy(x0, masked, t_seq[seq], train, mask_id)]
    if complementary:
        noisy.append(_noisy(x0, train & ~masked, 1.0 - t_seq[seq], train, mask_id))
    return noisy


def _noisy(x0, masked, t, train, mask_id) -> Noisy:
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return Noisy(x0, xt, masked, t.float(), train)
