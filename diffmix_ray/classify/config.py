"""Typed configuration of `train-cls`, validated before any worker starts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..contracts import DEFAULT_SCORES_NAME, SCORES_NAME_PATTERN
from ..errors import DiffmixError
from . import filters
from .losses import LOSSES, REWEIGHTED
from .mixing import DEFAULT_PROB as DEFAULT_MIX_PROB
from .schedule import SCHEDULES
from .transforms import AUGMENTS, RES_MODES

OPTIMIZERS = ("sgd", "adamw")
SYNTHETIC_SAMPLING = ("uniform", "inverse-frequency")
# pool: any synthetic image replaces a real one (Diff-Mix); own-source: one of the real image's own
# translations does (DA-Fusion: "each real image replaced by one of its own augmentations")
SYNTHETIC_PICK = ("pool", "own-source")
SELECT = ("val", "last")
# how --cutmix/--mixup mix: timm's batch-mode Mixup (real data only: it makes its own targets), or the
# Diff-Mix reference's (mixing.py: CutMix per sample, on the rows' own targets, synthetic ones included)
MIXING = ("timm", "reference")
LR_SCALING = ("none", "linear")
GPU_DECODE_ON_CPU = ("--gpu-decode decodes and augments the images on each worker's GPU (nvJPEG), but this run's "
                     "workers get no GPU ({why}): drop --gpu-decode (the data workers then decode on CPU), or "
                     "run on GPUs")


@dataclass(frozen=True)
class ClassifyConfig:
    dataset: str
    arch: str
    out: str
    synthetic: tuple[str, ...] = ()
    pretrained: str | None = None  # local file or directory of weights for `arch`; no hub access
    augment: str = "timm"  # timm | reference | reference-lt (transforms.py)
    img_size: int | None = None  # timm only; default: the architecture's own input size
    res_mode: int | None = None  # reference pipelines only: 224 | 384 | 448 (default 224)
    epochs: int = 30
    batch_size: int = 32  # per worker
    lr: float = 0.05
    lr_scaling: str = "none"  # linear: lr x global batch / lr_base_batch
    lr_base_batch: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step (schedule.py)
    # warm-up: at most one of the two; default 0.1 of all steps (cosine), 5 epochs (step)
    warmup_epochs: float | None = None
    warmup_fraction: float | None = None
    lr_milestones: tuple[int, ...] | None = None  # step: epochs where lr *= lr_decay; default 80%, 90%
    lr_decay: float = 0.01
    loss: str = "ce"  # ce | drw | balanced-softmax (losses.py)
    drw_epoch: int | None = None  # drw: re-weight from this epoch; default 80% of epochs (160 of 200)
    drw_beta: float = 0.9999
    label_smoothing: float = 0.1
    select: str = "val"  # val: the epoch with the best val top-1; last: the final epoch
    # Diff-Mix mixing: replace each real sample with probability p by a synthetic one
    synthetic_p: float | None = None  # default 0.1; 0.3 for few-shot and long-tail datasets
    synthetic_sampling: str | None = None  # default uniform; inverse-frequency on long-tailed datasets
    synthetic_pick: str = "pool"  # pool | own-source (SYNTHETIC_PICK)
    gamma: float = 0.5  # soft label y = (1 - s^gamma) onehot(src) + s^gamma onehot(tgt)
    # which synthetic images may be used, from their scores (filters.py): conditions, all of which must hold
    synthetic_filter: tuple[str, ...] = ()
    # the scores a filter reads: <synthetic>/scores/<name>, one name for every --synthetic or one each
    scores: tuple[str, ...] = ()
    allow_incomplete: bool = False  # shards without _SUCCESS, and scores without it
    # synthetic targets x this (the reference's soft_scaler; 1.0 = its paper-era trainer's -ss default)
    soft_scaler: float = 1.0
    # the mixing baselines; with --mixing reference also on top of synthetic data (Diff-Mix + CutMix)
    cutmix: bool = False
    mixup: bool = False
    mixing: str = "timm"  # timm | reference (MIXING)
    mix_prob: float | None = None  # timm: per batch; reference: CutMix per sample, Mixup per batch; default 0.5
    cmo: bool = False  # CMO (long-tail): a box of a minority-sampled image pasted in (mixing.py)
    drop_last: bool = True  # False: an epoch's incomplete last batch is trained on (the long-tail trainer)
    # many/medium/few as (MANY, FEW): many = more than MANY train images, few = fewer than FEW;
    # "20,5" or [20, 5] are accepted; None = the dataset's (dataset.json shot_thresholds)
    shot_thresholds: tuple[int, int] | None = None
    seed: int = 2020
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    max_failures: int = 2
    # execution (issue 12; none changes what is trained, so a run may resume with them changed):
    gpu_decode: bool = False  # decode JPEGs (nvJPEG) and augment on the training GPU, not on CPU workers
    checkpoint_every: int = 10  # epochs between full checkpoints (and one after the last epoch)
    test_every_epoch: bool = False  # score test every epoch (curves) instead of once on the selected weights
    _fail_at_epoch: int | None = None  # test hook: rank 1 dies once at this epoch

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, (list, str)):
            object.__setattr__(self, "synthetic", tuple([self.synthetic] if isinstance(self.synthetic, str)
                                                        else self.synthetic))
        # one form ('a,b' and [a, b] alike), so equal filters are the same run (the identity hashes the config)
        object.__setattr__(self, "synthetic_filter", filters.split_specs(self.synthetic_filter))
        if isinstance(self.scores, (list, str)):
            object.__setattr__(self, "scores", tuple([self.scores] if isinstance(self.scores, str) else self.scores))
        if isinstance(self.lr_milestones, (list, str)):  # YAML list or "160,180" from the command line
            object.__setattr__(self, "lr_milestones", parse_ints("--lr-milestones", self.lr_milestones))
        # one form, so "20,5" and [20, 5] are the same run (the output's identity hashes the config)
        object.__setattr__(self, "shot_thresholds", parse_shot_thresholds(self.shot_thresholds))

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise DiffmixError("--epochs and --batch-size must be >= 1")
        if self.lr <= 0:
            raise DiffmixError(f"--lr {self.lr} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise DiffmixError(f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.synthetic_p is not None and not 0.0 <= self.synthetic_p <= 1.0:
            raise DiffmixError(f"--synthetic-p {self.synthetic_p} is a probability: it must be in [0, 1]")
        if self.synthetic_sampling is not None and self.synthetic_sampling not in SYNTHETIC_SAMPLING:
            raise DiffmixError(f"--synthetic-sampling {self.synthetic_sampling!r}: choose "
                               f"{' or '.join(SYNTHETIC_SAMPLING)}")
        if self.synthetic_pick not in SYNTHETIC_PICK:
            raise DiffmixError(f"--synthetic-pick {self.synthetic_pick!r}: choose pool (any synthetic image, "
                               "Diff-Mix) or own-source (one of the real image's own translations, DA-Fusion)")
        if self.synthetic_pick == "own-source" and self.synthetic_sampling is not None:
            raise DiffmixError(f"--synthetic-sampling {self.synthetic_sampling} chooses among all synthetic images; "
                               "--synthetic-pick own-source takes one of the real image's own translations instead: "
                               "drop one of the two")
        if self.synthetic_pick == "own-source" and not self.synthetic:
            raise DiffmixError("--synthetic-pick own-source replaces real images by their own translations: pass "
                               "--synthetic with a generate output of an img2img mode (e.g. da-fusion)")
        if not self.gamma > 0:
            raise DiffmixError(f"--gamma {self.gamma} must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DiffmixError(f"--label-smoothing {self.label_smoothing} must be in [0, 1)")
        self._validate_mixing()
        self._validate_filter()
        self._validate_recipe()
        if self.workers < 1 or self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0:
            raise DiffmixError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
        if self.checkpoint_every < 1:
            raise DiffmixError(f"--checkpoint-every {self.checkpoint_every} counts epochs: it must be >= 1 (a "
                               "checkpoint is always written after the last epoch too)")
        if self.gpu_decode and self.gpus_per_worker is not None and self.gpus_per_worker <= 0:
            raise DiffmixError(GPU_DECODE_ON_CPU.format(why=f"--gpus-per-worker {self.gpus_per_worker:g}"))

    def _validate_mixing(self) -> None:
        if self.mixing not in MIXING:
            raise DiffmixError(f"--mixing {self.mixing!r}: choose {' or '.join(MIXING)}")
        if not 0.0 < self.soft_scaler <= 1.0:
            raise DiffmixError(f"--soft-scaler {self.soft_scaler} scales the synthetic targets: it must be in (0, 1] "
                               "(the reference uses 1.0, or 0.9 in its dataset classes' default)")
        if self.mix_prob is not None:
            if not (self.cutmix or self.mixup):
                raise DiffmixError("--mix-prob is the probability of --cutmix/--mixup: give one of them, or drop it")
            if not 0.0 <= self.mix_prob <= 1.0:
                raise DiffmixError(f"--mix-prob {self.mix_prob} is a probability: it must be in [0, 1]")
        if (self.cutmix or self.mixup) and self.synthetic and self.mixing == "timm":
            raise DiffmixError("--cutmix/--mixup with --synthetic: timm's Mixup makes its own targets from class "
                               "indices and would drop the synthetic soft labels; pass --mixing reference (the "
                               "Diff-Mix code's CutMix/Mixup, which mixes the soft labels)")
        if self.mixing == "reference" and self.cutmix and self.mixup:
            raise DiffmixError("--mixing reference: give --cutmix or --mixup, not both (timm's switches between them)")
        if self.cmo and (self.cutmix or self.mixup):
            raise DiffmixError("--cmo pastes minority patches itself: run it without --cutmix/--mixup")

    @property
    def resolved_mix_prob(self) -> float:
        return DEFAULT_MIX_PROB if self.mix_prob is None else self.mix_prob

    def _validate_recipe(self) -> None:
        choices = ((self.augment, "--augment", AUGMENTS), (self.schedule, "--schedule", SCHEDULES),
                   (self.loss, "--loss", LOSSES), (self.select, "--select", SELECT),
                   (self.lr_scaling, "--lr-scaling", LR_SCALING))
        for value, flag, allowed in choices:
            if value not in allowed:
                raise DiffmixError(f"{flag} {value!r}: choose {' or '.join(allowed)}")
        if self.augment == "timm" and self.res_mode is not None:
            raise DiffmixError(f"--res-mode {self.res_mode} sets the reference pipelines' resize -> crop; with "
                               "--augment timm give the input size as --img-size (or use --augment reference)")
        if self.augment != "timm" and self.img_size is not None:
            raise DiffmixError(f"--img-size is the input size of --augment timm; --augment {self.augment} takes "
                               f"--res-mode {'|'.join(map(str, RES_MODES))} (resize -> crop "
                               f"{', '.join(f'{r}->{c}' for r, c in RES_MODES.values())})")
        if self.res_mode is not None and self.res_mode not in RES_MODES:
            raise DiffmixError(f"--res-mode {self.res_mode}: choose {' or '.join(map(str, RES_MODES))}")
        if self.warmup_epochs is not None and self.warmup_fraction is not None:
            raise DiffmixError("give the warm-up once: --warmup-epochs N or --warmup-fraction F, not both")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise DiffmixError(f"--warmup-fraction {self.warmup_fraction} is a share of all steps: it must be in [0, 1)")
        if self.warmup_epochs is not None and not 0.0 <= self.warmup_epochs < self.epochs:
            raise DiffmixError(f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs})")
        if self.lr_base_batch < 1:
            raise DiffmixError(f"--lr-base-batch {self.lr_base_batch} must be >= 1")
        if self.lr_milestones is not None:
            if self.schedule != "step":
                raise DiffmixError("--lr-milestones belong to --schedule step; the cosine schedule has none")
            ms = list(self.lr_milestones)
            if ms != sorted(set(ms)) or any(not 0 < m < self.epochs for m in ms):
                raise DiffmixError(f"--lr-milestones {','.join(map(str, ms))} must be increasing epochs between 1 and "
                                   f"{self.epochs - 1} (--epochs {self.epochs}): a later one would never apply")
        if not 0.0 < self.lr_decay <= 1.0:
            raise DiffmixError(f"--lr-decay {self.lr_decay} is the factor per milestone: it must be in (0, 1]")
        if self.drw_epoch is not None:
            if self.loss not in REWEIGHTED:
                raise DiffmixError(f"--drw-epoch belongs to --loss {' or '.join(REWEIGHTED)} (this run uses --loss "
                                   f"{self.loss})")
            if not 0 <= self.drw_epoch < self.epochs:
                raise DiffmixError(f"--drw-epoch {self.drw_epoch} must be in [0, --epochs {self.epochs}): "
                                   "a later one would never re-weight")
        if not 0.0 <= self.drw_beta < 1.0:
            raise DiffmixError(f"--drw-beta {self.drw_beta} must be in [0, 1)")

    def _validate_filter(self) -> None:
        filters.parse(self.synthetic_filter)  # its syntax, columns and bands, before anything is read
        if self.synthetic_filter and not self.synthetic:
            raise DiffmixError("--synthetic-filter chooses among synthetic images: pass --synthetic (a generate output "
                               "with scores beside it)")
        if self.scores and not self.synthetic_filter:
            raise DiffmixError(f"--scores {','.join(self.scores)} names the scores a --synthetic-filter reads: give a "
                               "filter too (e.g. --synthetic-filter clip_object_prob:p10-100), or drop --scores")
        if len(self.scores) > 1 and len(self.scores) != len(self.synthetic):
            raise DiffmixError(f"--scores: {len(self.scores)} names for {len(self.synthetic)} --synthetic runs; give "
                               "one name for all of them, or one per --synthetic, in the same order")
        for name in self.scores:
            if not re.match(SCORES_NAME_PATTERN, name):
                raise DiffmixError(f"--scores {name!r} must be the --name of a `score` run: letters, digits, '.', '_' "
                                   "and '-', not starting with '.' or '-'")

    def score_names(self) -> list[str]:
        """The scores name each --synthetic run is filtered on (--scores, else `default`)."""
        names = self.scores or (DEFAULT_SCORES_NAME,)
        return [names[0] if len(names) == 1 else names[i] for i in range(len(self.synthetic))]

    def resolved_p(self, subset_kind: str | None) -> float:
        """The paper's replacement probability: 0.1 conventionally, 0.3 for few-shot/long-tail."""
        if self.synthetic_p is not None:
            return self.synthetic_p
        return 0.3 if subset_kind in ("few-shot", "long-tail") else 0.1


def parse_ints(flag: str, value) -> tuple[int, ...]:
    parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise DiffmixError(f"{flag} {value!r} must be whole numbers separated by commas, e.g. 160,180") from None


def parse_shot_thresholds(value) -> tuple[int, int] | None:
    """'20,5', [20, 5] or (20, 5) -> (20, 5); None stays None (the dataset's thresholds apply).
    prepare has its own parser for the same option: a stage does not import another's internals."""
    if value is None:
        return None
    hint = "(many = more than MANY train images, few = fewer than FEW)"
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if len(parts) != 2 or any(isinstance(p, float) and p != int(p) for p in parts):
        raise DiffmixError(f"--shot-thresholds {value!r} must be two whole numbers MANY,FEW, e.g. 20,5 {hint}")
    many, few = parse_ints("--shot-thresholds", parts)
    if few < 0 or many <= few:
        raise DiffmixError(f"--shot-thresholds {many},{few} is out of order: give MANY first, larger than FEW, "
                           f"and FEW >= 0, e.g. 20,5 {hint}")
    return many, few
