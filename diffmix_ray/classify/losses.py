"""Training losses, all defined on soft targets (Diff-Mix labels are soft: (1 - s^g) source + s^g
target, then label smoothing, mixup or cutmix), and the long-tail baselines Diff-Mix is combined with.

- `ce`: cross-entropy with the target distribution y: mean over the batch of -sum_c y_c log p_c.
- `balanced-softmax` (Ren et al. 2020, the reference's `BalancedSoftmaxLoss`): the same cross-entropy on
  logits + log(n_c / N), n_c = real train images of class c. Only training sees the shift; evaluation
  uses the plain logits. Soft targets enter exactly as in `ce`.
- `drw` (deferred re-weighting, Cao et al. 2019, as the reference's long-tail trainer): until epoch
  `drw_epoch` plain `ce`; from it, class weights w_c = (1 - beta) / (1 - beta^n_c) normalised to sum to
  C, beta = 0.9999. The weighted loss is PyTorch's CrossEntropyLoss(weight=w), as the reference uses it:
  with class indices (hard labels: real data only, no smoothing, no mixing) the weighted mean
  sum_i w_{y_i} l_i / sum_i w_{y_i}; with soft targets sum_i sum_c w_c y_ic (-log p_ic) / N. On one-hot
  targets the two differ by the batch factor sum_i w_{y_i} / N, so metrics.json records which one a run
  used (`hard_labels`).
- `ldam` (Cao et al. 2019, the reference's `LDAMLoss(max_m=0.5, s=30)` on its plain linear head):
  the target's logit lowered by the margin m_c ∝ n_c^(-1/4) (the largest 0.5), then cross-entropy on
  30 x the logits. On soft targets each logit is lowered by m_c y_c (the reference's one-hot case
  exactly; it has no soft-target form: its LDAM runs crash on synthetic labels). `ldam-drw`: the same,
  re-weighted as `drw` from `drw_epoch` (the reference's --loss_type LDAM --train_rule DRW).

Class counts of zero are refused by `check_counts`: both baselines divide by (a function of) n_c."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffmixError

LOSSES = ("ce", "drw", "balanced-softmax", "ldam", "ldam-drw")
REWEIGHTED = ("drw", "ldam-drw")  # losses that re-weight classes from drw_epoch on
LDAM_MAX_MARGIN, LDAM_SCALE = 0.5, 30.0
DRW_BETA = 0.9999
DEFAULT_DRW_FRACTION = 0.8  # epoch 160 of the reference's 200


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()


def drw_weights(counts, beta: float) -> np.ndarray:
    """Class-balanced weights from the effective number of samples, normalised to sum to C."""
    counts = np.asarray(counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts)) if beta > 0 else np.ones_like(counts)
    return w / w.sum() * len(counts)


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """CrossEntropyLoss(weight) on class indices `labels` when given, else on the soft `target`."""
    weight = weight.to(logits.device, torch.float32)
    if labels is not None:
        return F.cross_entropy(logits.float(), labels, weight=weight)
    return torch.sum(-weight * target * F.log_softmax(logits.float(), dim=1), dim=1).mean()


def balanced_softmax(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    return soft_ce(logits.float() + log_prior.to(logits.device), target)


def ldam_margins(counts) -> np.ndarray:
    """m_c = n_c^(-1/4), scaled so the largest (the rarest class's) is LDAM_MAX_MARGIN."""
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, dtype=np.float64)))
    return m * (LDAM_MAX_MARGIN / m.max())


def ldam(logits: torch.Tensor, target: torch.Tensor, margins: torch.Tensor, weight: torch.Tensor | None = None,
         labels: torch.Tensor | None = None) -> torch.Tensor:
    """LDAM: with class indices `labels` the reference's loss exactly; else on the soft `target`."""
    shifted = logits.float() - margins.to(logits.device) * target
    if labels is not None:
        return F.cross_entropy(LDAM_SCALE * shifted, labels,
                               weight=None if weight is None else weight.to(logits.device, torch.float32))
    if weight is None:
        return soft_ce(LDAM_SCALE * shifted, target)
    return weighted_ce(LDAM_SCALE * shifted, target, weight)


def check_counts(loss: str, counts) -> None:
    empty = [c for c, n in enumerate(counts) if n <= 0]
    if loss != "ce" and empty:
        raise DiffmixError(f"--loss {loss} weights classes by their train images, but class(es) {empty[:10]} have "
                           "none: use --loss ce, or a dataset with every class in its train split")


class Criterion:
    """The loss of one epoch: `criterion.for_epoch(e)(logits, target, labels)`."""

    def __init__(self, loss: str, counts, drw_epoch: int | None = None, beta: float = DRW_BETA,
                 hard_labels: bool = False):
        check_counts(loss, counts)
        self.loss, self.drw_epoch, self.hard_labels = loss, drw_epoch, hard_labels
        counts = np.asarray(counts, dtype=np.float64)
        self.log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)[None]
        self.weights = torch.tensor(drw_weights(counts, beta), dtype=torch.float32)
        self.margins = torch.tensor(ldam_margins(counts), dtype=torch.float32)[None] if loss.startswith("ldam") \
            else None

    def to(self, device) -> "Criterion":
        """Keep the class statistics on the training device: copying them there at every step would
        make each step wait for the copy."""
        self.log_prior, self.weights = self.log_prior.to(device), self.weights.to(device)
        if self.margins is not None:
            self.margins = self.margins.to(device)
        return self

    def for_epoch(self, epoch: int):
        hard = (lambda labels: labels) if self.hard_labels else (lambda labels: None)
        reweight = self.loss in REWEIGHTED and epoch >= self.drw_epoch
        if self.loss == "balanced-softmax":
            return lambda logits, target, labels: balanced_softmax(logits, target, self.log_prior)
        if self.loss.startswith("ldam"):
            weight = self.weights if reweight else None
            return lambda logits, target, labels: ldam(logits, target, self.margins, weight, hard(labels))
        if reweight:
            return lambda logits, target, labels: weighted_ce(logits, target, self.weights, hard(labels))
        return lambda logits, target, labels: soft_ce(logits, target)
