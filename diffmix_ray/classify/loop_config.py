"""What a training worker reads: the run's options and what the driver resolved from them (the
recipe, the rows of every split, the image columns in the object store), built once on the driver
(run.py) and shipped to every worker, where nothing is looked up by a string key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .data import Rows
from .schedule import Schedule


# eq=False: the rows and weights are arrays, and a config is never compared, only read.
@dataclass(frozen=True, eq=False)
class LoopConfig:
    # The run's options (ClassifyConfig fields of the same name).
    arch: str
    pretrained: str | None
    epochs: int
    batch_size: int  # per worker
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    loss: str
    drw_beta: float
    label_smoothing: float
    gamma: float
    soft_scaler: float
    cutmix: bool
    mixup: bool
    mixing: str
    mix_prob: float | None
    cmo: bool
    drop_last: bool
    select: str
    seed: int
    cpus_per_worker: float
    gpu_decode: bool
    checkpoint_every: int
    test_every_epoch: bool
    _fail_at_epoch: int | None  # test hook: rank 1 (or 0 alone) dies once at this epoch
    _hold_at_epoch: int | None  # test hook: rank 0 waits once before this epoch, for its node to die
    # Resolved on the driver.
    out: str  # the run's output: best/, the divergence marker and the test hooks' once-markers
    num_classes: int
    dataset_fingerprint: str
    data_cfg: dict  # transforms.data_config: the image pipelines, stored with the weights
    lr_schedule: Schedule  # the rate as a function of the step count
    train_counts: list[int]  # train images per class
    drw_epoch: int | None
    hard_labels: bool
    p: float  # the probability that a real sample is replaced by a synthetic one
    refs: list  # object refs of the image columns, one per file of `uris`
    uris: list[str]  # every image file the run reads (train, synthetic, val, test)
    block_rows: int  # rows per read task
    real_rows: Rows
    syn_rows: Rows
    val_rows: Rows
    test_rows: Rows
    syn_weights: np.ndarray | None  # per synthetic row, how likely it is drawn (None: uniformly)
    own: tuple | None  # --synthetic-pick own-source: each train image's own translations
    cmo_weights: np.ndarray | None  # CMO: per train row, how likely it is drawn into the minority stream

    @classmethod
    def of(cls, options, **resolved) -> "LoopConfig":
        """The loop config of a run: its options (a ClassifyConfig) by name, and what the driver resolved."""
        names = {f.name for f in dataclasses.fields(cls)} - set(resolved)
        return cls(**{name: getattr(options, name) for name in names}, **resolved)

    def rows(self, split: str) -> Rows:
        """The rows of "real" (train), "syn", "val" or "test"."""
        return getattr(self, f"{split}_rows")
