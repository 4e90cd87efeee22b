"""Typed configuration of `train-cls`, validated before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffmixError

OPTIMIZERS = ("sgd", "adamw")
SYNTHETIC_SAMPLING = ("uniform", "inverse-frequency")


@dataclass(frozen=True)
class ClassifyConfig:
    dataset: str
    arch: str
    out: str
    synthetic: tuple[str, ...] = ()
    pretrained: str | None = None  # local file or directory of weights for `arch`; no hub access
    img_size: int | None = None  # default: the architecture's own input size
    epochs: int = 30
    batch_size: int = 32  # per worker
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    # Diff-Mix mixing: replace each real sample with probability p by a synthetic one
    synthetic_p: float | None = None  # default 0.1; 0.3 for few-shot and long-tail datasets
    synthetic_sampling: str = "uniform"
    gamma: float = 0.5  # soft label y = (1 - s^gamma) onehot(src) + s^gamma onehot(tgt)
    allow_incomplete: bool = False
    # non-generative baselines (real data only)
    cutmix: bool = False
    mixup: bool = False
    # long-tail reporting: many > many_threshold train images, few < few_threshold
    many_threshold: int = 20
    few_threshold: int = 5
    seed: int = 2020
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    max_failures: int = 2
    _fail_at_epoch: int | None = None  # test hook: rank 1 dies once at this epoch

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, (list, str)):
            object.__setattr__(self, "synthetic", tuple([self.synthetic] if isinstance(self.synthetic, str)
                                                        else self.synthetic))

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise DiffmixError("--epochs and --batch-size must be >= 1")
        if self.lr <= 0:
            raise DiffmixError(f"--lr {self.lr} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise DiffmixError(f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.synthetic_p is not None and not 0.0 <= self.synthetic_p <= 1.0:
            raise DiffmixError(f"--synthetic-p {self.synthetic_p} is a probability: it must be in [0, 1]")
        if self.synthetic_sampling not in SYNTHETIC_SAMPLING:
            raise DiffmixError(f"--synthetic-sampling {self.synthetic_sampling!r}: choose "
                               f"{' or '.join(SYNTHETIC_SAMPLING)}")
        if not self.gamma > 0:
            raise DiffmixError(f"--gamma {self.gamma} must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DiffmixError(f"--label-smoothing {self.label_smoothing} must be in [0, 1)")
        if (self.cutmix or self.mixup) and self.synthetic:
            raise DiffmixError("--cutmix/--mixup are the real-data baselines; run them without --synthetic")
        if self.workers < 1 or self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0:
            raise DiffmixError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")

    def resolved_p(self, subset_kind: str | None) -> float:
        """The paper's replacement probability: 0.1 conventionally, 0.3 for few-shot/long-tail."""
        if self.synthetic_p is not None:
            return self.synthetic_p
        return 0.3 if subset_kind in ("few-shot", "long-tail") else 0.1
