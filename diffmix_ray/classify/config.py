"""Typed configuration of `train-cls`, validated before any worker starts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import config
from ..config import EXECUTION, UNLESS_DEFAULT, option
from ..contracts import DEFAULT_SCORES_NAME, SCORES_NAME_PATTERN
from ..errors import DiffmixError
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


def _many(value: list[str], flag: str) -> tuple[str, ...] | None:
    """A repeatable option: what typer collected, or None when it was not given."""
    return tuple(value) or None


# Identity: every option decides the trained model unless marked EXECUTION (may change between a run and its
# resume); UNLESS_DEFAULT ones came after runs were written, which keep their identity at the default.
@dataclass(frozen=True)
class ClassifyConfig:
    dataset: str = option(help="Canonical dataset URI.")
    arch: str = option(help="timm architecture, e.g. resnet50, vit_base_patch16_384.")
    out: str = option(identity=EXECUTION, help="Output URI: metrics.json, best/, checkpoints under train/.")
    synthetic: tuple[str, ...] = option((), after="dataset", cli_type=list[str], parse=_many,
                                        help="Synthetic shards URI (from generate); repeatable.")
    # local file or directory of weights for `arch`; no hub access
    pretrained: str | None = option(None, help="Local weights file/folder for --arch (no hub access).")
    augment: str = option("timm", help="Image pipeline: timm (default; the architecture's) | reference (Diff-Mix: "
                          "Resize((r,r)) > RandomCrop(c, pad 8) > flip) | reference-lt (its long-tail trainer: "
                          "RandomResizedCrop > flip > ColorJitter 0.4).")  # transforms.py
    res_mode: int | None = option(None, help="reference pipelines: 224 | 384 | 448 = resize>crop 256>224, 440>384, "
                                  "512>448 (default 224).")
    img_size: int | None = option(None, help="--augment timm: input size (default: the architecture's).")
    epochs: int = option(30, help="Epochs (default 30).")
    batch_size: int = option(32, help="Batch size per worker (default 32).")
    lr: float = option(0.05, help="Peak learning rate (default 0.05).")
    lr_scaling: str = option("none", help="none (default) | linear: lr x global batch / --lr-base-batch.")
    lr_base_batch: int = option(256, help="Global batch --lr is given for under linear scaling (default 256).")
    optimizer: str = option("sgd", help="sgd (default) | adamw.")
    momentum: float = option(0.9, cli=False, help="SGD momentum.")
    weight_decay: float = option(5e-4, help="Weight decay (default 5e-4).")
    schedule: str = option("cosine", help="cosine (default; to 0 over all steps) | step (x--lr-decay at each "
                           "--lr-milestones epoch; the long-tail trainer's).")  # schedule.py
    # warm-up: at most one of the two; default 0.1 of all steps (cosine), 5 epochs (step)
    warmup_fraction: float | None = option(None, help="Linear warm-up over this share of all steps (default 0.1 "
                                           "with cosine, the reference's).")
    warmup_epochs: float | None = option(None, help="Linear warm-up in epochs instead (default 5 with step).")
    # "160,180" from the command line, a list from YAML
    lr_milestones: tuple[int, ...] | None = option(None, cli_type=str, help="step: epochs where the lr is "
                                                   "multiplied by --lr-decay (default 80%,90% of --epochs: 160,180 "
                                                   "of 200).")
    lr_decay: float = option(0.01, help="step: factor per milestone (default 0.01).")
    loss: str = option("ce", help="ce (default) | drw (class re-weighting from --drw-epoch) | balanced-softmax | "
                       "ldam | ldam-drw (LDAM margins, + drw).")  # losses.py
    drw_epoch: int | None = option(None, help="drw: first re-weighted epoch (default 80% of --epochs: 160 of 200).")
    drw_beta: float = option(0.9999, help="drw: effective-number beta (default 0.9999).")
    label_smoothing: float = option(0.1, help="Label smoothing on the soft target (default 0.1).")
    select: str = option("val", help="val (default): report the epoch with the best val top-1 | last: the final "
                         "epoch (datasets without val; published-number protocol).")
    # many/medium/few as (MANY, FEW): many = more than MANY train images, few = fewer than FEW;
    # "20,5" or [20, 5] are accepted; None = the dataset's (dataset.json shot_thresholds)
    shot_thresholds: tuple[int, int] | None = option(None, cli_type=str, help="MANY,FEW for many/medium/few "
                                                     "(default: the dataset's, from dataset.json).")
    # Diff-Mix mixing: replace each real sample with probability p by a synthetic one
    synthetic_p: float | None = option(None, help="P(replace a real sample by a synthetic one); default 0.1, 0.3 "
                                       "for few-shot/long-tail.")
    synthetic_sampling: str | None = option(None, help="uniform | inverse-frequency (by target class ∝ 1/(n_c+1)); "
                                            "default inverse-frequency on long-tailed datasets.")
    synthetic_pick: str = option("pool", help="pool (default; Diff-Mix: any synthetic image, drawn by "
                                 "--synthetic-sampling) | own-source (DA-Fusion: one of the real image's own "
                                 "translations).")  # SYNTHETIC_PICK
    gamma: float = option(0.5, help="Soft-label exponent: y = (1-s^g) src + s^g tgt (default 0.5).")
    # which synthetic images may be used, from their scores (filters.py): conditions, all of which must hold;
    # none: runs written before filters existed keep their identity
    synthetic_filter: tuple[str, ...] = option(
        (), identity=UNLESS_DEFAULT, cli_type=list[str], parse=_many,
        help="Keep synthetic images whose scores pass every condition: COLUMN>=VALUE (>, <=, <), COLUMN:pA-B "
             "(percentile band, e.g. clip_object_prob:p10-100), COLUMN:pA-B@class (per target class); repeatable "
             "or comma-separated.")
    # the scores a filter reads: <synthetic>/scores/<name>, one name for every --synthetic or one each;
    # in the identity only with a filter (identity())
    scores: tuple[str, ...] = option((), cli_type=list[str], parse=_many, help="The scores a filter reads: "
                                     "<synthetic>/scores/NAME (default 'default'); once for all --synthetic, or "
                                     "once each.")
    allow_incomplete: bool = option(False, flags=("--allow-incomplete",),
                                    help="Accept shards (and scores) without _SUCCESS.")
    # the mixing baselines; with --mixing reference also on top of synthetic data (Diff-Mix + CutMix)
    cutmix: bool = option(False, flags=("--cutmix",),
                          help="CutMix baseline (with --synthetic: needs --mixing reference).")
    mixup: bool = option(False, flags=("--mixup",), help="Mixup baseline (with --synthetic: needs --mixing reference).")
    mixing: str = option("timm", identity=UNLESS_DEFAULT, help="timm (default; batch mode, real data only) | "
                         "reference (the Diff-Mix code's: CutMix per sample on the rows' own, soft, labels).")
    # timm: per batch; reference: CutMix per sample, Mixup per batch; default 0.5
    mix_prob: float | None = option(None, identity=UNLESS_DEFAULT, help="Probability of --cutmix/--mixup (default "
                                    "0.5; reference CutMix: per sample).")
    cmo: bool = option(False, identity=UNLESS_DEFAULT, flags=("--cmo",), help="CMO long-tail baseline: a box of a "
                       "minority-sampled image (1/n_c) pasted in, p 0.5 per batch.")  # mixing.py
    # synthetic targets x this (the reference's soft_scaler; 1.0 = its paper-era trainer's -ss default)
    soft_scaler: float = option(1.0, identity=UNLESS_DEFAULT, help="Synthetic targets x this (default 1.0; the "
                                "reference's dataset classes use 0.9).")
    # False: an epoch's incomplete last batch is trained on (the long-tail trainer)
    drop_last: bool = option(True, identity=UNLESS_DEFAULT, flags=("--drop-last/--no-drop-last",),
                             help="Drop each epoch's incomplete last batch (default) or train on it (the long-tail "
                                  "trainer).")
    seed: int = option(2020, help="Seed (default 2020).")
    # execution: none changes what is trained, so a run may resume with them changed
    workers: int = option(1, identity=EXECUTION, help="Ray Train workers (DDP).")
    cpus_per_worker: float = option(1.0, identity=EXECUTION, help="CPUs per worker (default 1).")
    # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    gpus_per_worker: float | None = option(None, identity=EXECUTION, help="GPUs per worker. Default: 1 when the Ray "
                                           "cluster has GPUs or its autoscaler can add them, else 0 (CPU).")
    max_failures: int = option(2, identity=EXECUTION, cli=False, help="Worker failures Ray Train survives.")
    gpu_decode: bool = option(False, identity=EXECUTION, flags=("--gpu-decode",), help="Decode JPEGs (nvJPEG) and "
                              "augment on each worker's GPU instead of CPU data workers: for nodes with few CPU cores "
                              "per GPU. GPU workers only.")
    checkpoint_every: int = option(10, identity=EXECUTION, help="Epochs between full checkpoints (default 10; one "
                                   "is always written after the last epoch). A resumed run restarts from the last "
                                   "one.")
    test_every_epoch: bool = option(False, identity=EXECUTION, flags=("--test-every-epoch",), help="Score test "
                                    "every epoch (for curves) instead of once, on the selected weights.")
    _fail_at_epoch: int | None = None  # test hook: rank 1 dies once at this epoch
    _hold_at_epoch: int | None = None  # test hook: rank 0 waits once before this epoch, for its node to die

    def identity(self) -> dict:
        """The options that decide the trained model (config.identity); the scores' names only with a
        filter, which reads them (runs written before filters existed keep their identity)."""
        ident = config.identity(self)
        if not self.synthetic_filter:
            ident.pop("scores")
        return ident

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, (list, str)):
            object.__setattr__(self, "synthetic", tuple([self.synthetic] if isinstance(self.synthetic, str)
                                                        else self.synthetic))
        # one form ('a,b' and [a, b] alike), so equal filters are the same run (the identity hashes the config)
        from . import filters  # pyarrow: not when the command line only parses

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
        from .mixing import DEFAULT_PROB  # torch: not when the command line only parses

        return DEFAULT_PROB if self.mix_prob is None else self.mix_prob

    def _validate_recipe(self) -> None:
        from .losses import LOSSES, REWEIGHTED  # torch: not when the command line only parses

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
        from . import filters

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
