"""What a train-cls run actually uses and why: options the user left open are resolved here from the
dataset (long-tail or not, its splits, its many/few thresholds) and the run's size. Each resolved
value is printed at the start of the run and recorded in metrics.json ("resolved"), with where it
came from, so a number in a table can be traced to its protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contracts import DatasetInfo
from ..errors import DiffmixError
from . import schedule as sch
from .config import ClassifyConfig
from .losses import DEFAULT_DRW_FRACTION, REWEIGHTED, check_counts
from .transforms import data_config, describe

CMO_PROB = 0.5  # the reference's --mixup_prob
CMO_EDGE_EPOCHS = 3  # its --start_data_aug / --end_data_aug: CMO while 3 < epoch < epochs - 3


def cmo_active(epoch: int, epochs: int) -> bool:
    return CMO_EDGE_EPOCHS < epoch < epochs - CMO_EDGE_EPOCHS


@dataclass
class Recipe:
    p: float
    synthetic_sampling: str
    schedule: sch.Schedule
    drw_epoch: int | None
    hard_labels: bool
    thresholds: tuple[int, int] | None  # None: no many/medium/few grouping
    data_cfg: dict
    resolved: dict = field(default_factory=dict)  # name -> {"value", "from"}, for metrics.json
    notes: list[str] = field(default_factory=list)  # lines printed at the start of the run

    def set(self, name: str, value, source: str) -> None:
        self.resolved[name] = {"value": value, "from": source}


def check_splits(cfg: ClassifyConfig, info: DatasetInfo, where: str) -> str | None:
    """Refuse selection on a val split that does not exist; with --select last and a val split,
    the one line that says what it leaves out (None otherwise)."""
    if cfg.select == "val" and not info.has_split("val"):
        raise DiffmixError(f"{where} has no val split, and --select val picks the epoch by val top-1 (test never "
                           "selects anything): pass --select last to report the final epoch and train on the whole "
                           "train split, or re-run prepare with --val-fraction > 0")
    if cfg.select == "last" and info.has_split("val"):
        return (f"--select last: reporting the final epoch; the val split ({info.split_size('val')} images) is "
                "scored each epoch but selects nothing and is not trained on (prepare with --val-fraction 0 "
                "to train on it)")
    return None


def resolve(cfg: ClassifyConfig, info: DatasetInfo, num_real: int, num_synthetic: int) -> Recipe:
    kind = info.subset.get("kind")
    long_tail = kind == "long-tail"
    counts = info.class_counts("train")
    check_counts(cfg.loss, counts)

    p = cfg.resolved_p(kind) if num_synthetic else 0.0
    p_from = ("--synthetic-p" if cfg.synthetic_p is not None else "no synthetic data" if not num_synthetic
              else f"default for {kind} datasets (the paper's 0.3)" if kind in ("few-shot", "long-tail")
              else "default (the paper's 0.1)")
    sampling = cfg.synthetic_sampling or ("inverse-frequency" if long_tail else "uniform")
    sampling_from = ("--synthetic-sampling" if cfg.synthetic_sampling
                     else "default for long-tailed datasets (the paper's)" if long_tail else "default")
    if cfg.synthetic_pick == "own-source":
        sampling, sampling_from = "own-source", ("--synthetic-pick own-source: a replaced image is one of the real "
                                                 "image's own translations, uniformly (DA-Fusion)")

    global_batch = cfg.batch_size * cfg.workers
    peak = sch.scaled_lr(cfg.lr, cfg.lr_scaling, global_batch, cfg.lr_base_batch)
    per_worker = num_real // cfg.workers
    steps_per_epoch = per_worker // cfg.batch_size if cfg.drop_last else -(-per_worker // cfg.batch_size)
    if steps_per_epoch == 0:
        raise DiffmixError(f"{num_real} train images over {cfg.workers} worker(s) fill no batch of --batch-size "
                           f"{cfg.batch_size} (incomplete batches are dropped): lower --batch-size or --workers, "
                           "or keep the incomplete batch (--no-drop-last)")
    warm, warm_from = sch.warmup_epochs(cfg.schedule, cfg.epochs, cfg.warmup_epochs, cfg.warmup_fraction)
    milestones = ()
    if cfg.schedule == "step":
        milestones = cfg.lr_milestones if cfg.lr_milestones is not None else sch.default_milestones(cfg.epochs)
    schedule = sch.Schedule(cfg.schedule, peak, steps_per_epoch, cfg.epochs, warm, tuple(milestones), cfg.lr_decay)

    drw_epoch = None
    if cfg.loss in REWEIGHTED:
        drw_epoch = cfg.drw_epoch if cfg.drw_epoch is not None else int(round(DEFAULT_DRW_FRACTION * cfg.epochs))
    # the reference's loss sees class indices only for real-only, unsmoothed, unmixed training
    hard = not num_synthetic and not (cfg.cutmix or cfg.mixup or cfg.cmo) and cfg.label_smoothing == 0

    thresholds, th_from = cfg.shot_thresholds, "--shot-thresholds"
    if thresholds is None:
        thresholds = info.many_few() if long_tail else None
        th_from = ("dataset.json" if info.shot_thresholds else "default (dataset.json has none)") if long_tail \
            else "not grouped: the dataset is not long-tailed (give --shot-thresholds to group anyway)"

    d = data_config(cfg.arch, cfg.augment, cfg.img_size, cfg.res_mode)
    r = Recipe(p, sampling, schedule, drw_epoch, hard, thresholds, d)
    r.set("synthetic_p", p, p_from)
    r.set("synthetic_sampling", sampling, sampling_from)
    r.set("augment", d, "--augment" if cfg.augment != "timm" else "default (timm's pipeline for the architecture)")
    r.set("peak_lr", peak, f"--lr {cfg.lr:g} x global batch {global_batch} / {cfg.lr_base_batch} (--lr-scaling linear)"
          if cfg.lr_scaling == "linear" else f"--lr {cfg.lr:g}, not scaled with the global batch {global_batch}")
    r.set("global_batch", global_batch, f"--batch-size {cfg.batch_size} x --workers {cfg.workers}")
    r.set("schedule", schedule.describe(), f"--schedule {cfg.schedule}" if cfg.schedule != "cosine" else "default")
    r.set("warmup_epochs", warm, warm_from)
    if cfg.schedule == "step":
        r.set("lr_milestones", list(milestones), "--lr-milestones" if cfg.lr_milestones is not None
              else "default: 80% and 90% of --epochs (160 and 180 of the reference's 200)")
    if drw_epoch is not None:
        r.set("drw_epoch", drw_epoch, "--drw-epoch" if cfg.drw_epoch is not None
              else "default: 80% of --epochs (160 of the reference's 200)")
    last = per_worker % cfg.batch_size
    r.set("batches", {"steps_per_epoch": steps_per_epoch, "last_batch": last if not cfg.drop_last and last else None},
          "--no-drop-last: each epoch's incomplete last batch is trained on (the reference's long-tail trainer)"
          if not cfg.drop_last else f"whole batches only: {last} image(s) per worker left out of each epoch "
          "(the reference's conventional trainer skips its incomplete batch)")
    if cfg.cutmix or cfg.mixup:
        kind = "+".join(k for k in ("cutmix", "mixup") if getattr(cfg, k))
        how = {"timm": "timm's Mixup in batch mode: one coin per batch",
               "reference": "the Diff-Mix code's: CutMix with one coin per sample, the partner another sample of "
                            "the batch" if cfg.cutmix else "the Diff-Mix code's Mixup: one coin per batch"}
        r.set("mixing", {"kind": kind, "style": cfg.mixing, "prob": cfg.resolved_mix_prob},
              f"--mixing {cfg.mixing} ({how[cfg.mixing]}), probability " +
              ("--mix-prob" if cfg.mix_prob is not None else "default 0.5"))
    if cfg.cmo:
        r.set("cmo", {"prob": CMO_PROB, "epochs": [CMO_EDGE_EPOCHS + 1, cfg.epochs - CMO_EDGE_EPOCHS - 1]},
              "the reference's CMO: probability 0.5 per batch, from epoch 4 to epochs - 4 (its start/end_data_aug 3), "
              "minority images drawn with class weights 1/n_c")
    if cfg.soft_scaler != 1.0:
        r.set("soft_scaler", cfg.soft_scaler,
              "--soft-scaler: synthetic targets scaled (the reference's dataset classes)")
    r.set("hard_labels", hard, "real data only, no label smoothing, no mixup/cutmix/cmo" if hard
          else "soft targets (synthetic data, label smoothing or mixing)")
    r.set("shot_thresholds", None if thresholds is None else {"many": thresholds[0], "few": thresholds[1]}, th_from)
    r.set("select", cfg.select, "--select" if cfg.select != "val" else "default")

    r.notes.append(f"augment: {describe(d)}; schedule: {schedule.describe()}")
    if cfg.augment != "timm":
        own = data_config(cfg.arch, "timm", None, None)
        if (own["mean"], own["std"]) != (d["mean"], d["std"]):
            r.notes.append(f"--augment {cfg.augment} normalises with ImageNet's mean/std as the reference does (its "
                           f"torchvision weights expect it); {cfg.arch}'s timm config uses mean {own['mean']}, std "
                           f"{own['std']}: weights trained that way see shifted inputs (--augment timm keeps them)")
    if cfg.loss != "ce":
        r.notes.append(f"loss {cfg.loss}" + (f": class re-weighting (beta {cfg.drw_beta:g}) from epoch {drw_epoch}"
                                             if drw_epoch is not None else ""))
    if long_tail and num_synthetic and not cfg.synthetic_sampling and cfg.synthetic_pick == "pool":
        r.notes.append(f"long-tailed dataset (imbalance ratio {info.subset.get('imbalance_ratio')}): synthetic "
                       "images drawn by target class ∝ 1/(n_c + 1), the paper's default (--synthetic-sampling "
                       "uniform to change)")
    if counts and min(counts) == max(counts):
        same = ([f"--loss {cfg.loss} (on equal counts it is plain cross-entropy)"]
                if cfg.loss in ("drw", "balanced-softmax") else [])
        if cfg.synthetic_sampling == "inverse-frequency":
            same.append("--synthetic-sampling inverse-frequency (equal weights 1/(n_c + 1): uniform)")
        if same:
            r.notes.append(f"{' and '.join(same)}: every class has {counts[0]} train images, so these long-tail "
                           "options change nothing here; they are meant for long-tailed datasets")
    if thresholds is not None:
        r.notes.append(f"many/medium/few: more than {thresholds[0]} / {thresholds[1]}-{thresholds[0]} / fewer than "
                       f"{thresholds[1]} train images ({th_from})")
    return r
