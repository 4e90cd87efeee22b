"""Learning-rate schedules as plain functions of the optimizer step: no torch scheduler state, so a
resumed run gets the same rate from the step count it checkpointed.

- `cosine` (the Diff-Mix code's conventional/few-shot trainer): cosine annealing to 0 over all steps,
  multiplied by a linear warm-up min(1, (t + 1) / W) over the first W steps (pytorch_warmup's
  LinearWarmup, which the reference uses; its default W is 10% of all steps).
- `step` (the Diff-Mix code's long-tail trainer): changes at epoch boundaries only, as the reference
  sets it once per epoch: linear warm-up min(1, (e + 1) / E_w) over E_w epochs (5), then the rate times
  `decay` for every milestone passed (x0.01 from epoch 160, x1e-4 from 180, of 200)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "step")
DEFAULT_WARMUP_FRACTION = 0.1  # cosine: the reference's 10% of all steps
DEFAULT_WARMUP_EPOCHS_STEP = 5.0  # step: the reference's long-tail trainer
DEFAULT_MILESTONE_FRACTIONS = (0.8, 0.9)  # 160 and 180 of the reference's 200 epochs
DEFAULT_STEP_DECAY = 0.01


@dataclass(frozen=True)
class Schedule:
    kind: str
    peak_lr: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float  # the warm-up length; cosine turns it into whole steps
    milestones: tuple[int, ...] = ()
    decay: float = DEFAULT_STEP_DECAY

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    def lr(self, step: int) -> float:
        """The rate optimizer step `step` (0-based) uses."""
        if self.kind == "cosine":
            warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
            return self.peak_lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        epoch = step // max(1, self.steps_per_epoch)
        warm = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return self.peak_lr * warm * self.decay ** sum(epoch >= m for m in self.milestones)

    def describe(self) -> str:
        if self.kind == "cosine":
            warm = (f"linear warm-up over the first {self.warmup_steps} ({self.warmup_epochs:g} epochs)"
                    if self.warmup_steps else "no warm-up")
            return f"cosine to 0 over {self.total_steps} steps, {warm}, peak lr {self.peak_lr:g}"
        warm = f"linear warm-up over {self.warmup_epochs:g} epochs" if self.warmup_epochs else "no warm-up"
        return (f"step: {warm}, x{self.decay:g} from each of epochs "
                f"{', '.join(map(str, self.milestones)) or '(none)'}, peak lr {self.peak_lr:g}")


def default_milestones(epochs: int) -> tuple[int, ...]:
    """80% and 90% of the run: the reference's 160 and 180 of 200 epochs, wherever the run ends."""
    return tuple(int(round(f * epochs)) for f in DEFAULT_MILESTONE_FRACTIONS)


def warmup_epochs(kind: str, epochs: int, warmup_epochs_opt: float | None,
                  warmup_fraction_opt: float | None) -> tuple[float, str]:
    """The warm-up length in epochs and where it came from (for the run's record)."""
    if warmup_epochs_opt is not None:
        return float(warmup_epochs_opt), f"--warmup-epochs {warmup_epochs_opt:g}"
    if warmup_fraction_opt is not None:
        return warmup_fraction_opt * epochs, f"--warmup-fraction {warmup_fraction_opt:g} of {epochs} epochs"
    if kind == "step":
        return DEFAULT_WARMUP_EPOCHS_STEP, "default of --schedule step (the reference's long-tail trainer)"
    return DEFAULT_WARMUP_FRACTION * epochs, f"default: {DEFAULT_WARMUP_FRACTION:g} of all steps (the reference's)"


def scaled_lr(lr: float, scaling: str, global_batch: int, base_batch: int) -> float:
    """`linear`: lr x global batch / base batch (Goyal et al.); `none`: lr as given."""
    return lr * global_batch / base_batch if scaling == "linear" else lr
