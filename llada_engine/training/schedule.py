"""A training run as a list of phases, and its learning rate (docs/ARCHITECTURE.md, Training).

Each phase trains one objective at one block size for a number of steps at a peak learning rate; the
phases run one after the other. Over the whole run the learning rate follows warmup-stable-decay (WSD):
linear from 0 over the first `warmup_steps`, the phase's peak, then linear down to `min_lr_ratio` x peak
over the last `decay_steps`. Steps are counted from 0 over the whole run.
"""
import dataclasses
from typing import Optional

OBJECTIVES = ("ar", "bdlm", "mdlm", "dpo")
WEIGHTINGS = ("elbo", "mean")


@dataclasses.dataclass
class Phase:
    objective: str
    steps: int
    block_size: int                 # "full" in a config file: the row length
    lr: float
    name: str = ""
    t_min: float = 1e-3             # per document t ~ U[t_min, t_max], each token masked with probability t
    t_max: float = 1.0
    weighting: str = "elbo"         # elbo: sum of CE / t per trainable token; mean: CE per masked token
    complementary: bool = False     # each row twice: with mask M and with its complement
    mask_band: Optional[tuple[float, float]] = None  # each document's mask ratio drawn inside [lo, hi]
    cap_lambda: float = 0.0         # weight of the CAP entropy term
    beta: float = 0.1               # DPO temperature


@dataclasses.dataclass
class Schedule:
    phases: list[Phase]
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.0

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_index(self, step: int) -> int:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the run's {self.total_steps} steps")
        for i, phase in enumerate(self.phases):
            if step < phase.steps:
                return i
            step -= phase.steps
        raise AssertionError("unreachable")

    def phase_at(self, step: int) -> Phase:
        return self.phases[self.phase_index(step)]

    def boundaries(self) -> list[int]:
        """The first step of each phase."""
        starts, step = [], 0
        for phase in self.phases:
            starts.append(step)
            step += phase.steps
        return starts

    def lr_factor(self, step: int) -> float:
        total = self.total_steps
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_start = total - self.decay_steps
        if self.decay_steps and step >= decay_start:
            done = (step - decay_start + 1) / self.decay_steps
            return 1.0 - done * (1.0 - self.min_lr_ratio)
        return 1.0

    def lr_at(self, step: int) -> float:
        return self.phase_at(step).lr * self.lr_factor(step)
