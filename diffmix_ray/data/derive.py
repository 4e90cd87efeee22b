"""`diffmix-ray prepare --from`: a few-shot or long-tail subset of a canonical dataset's train split,
written as a new root. Val and test are copied unchanged, so results stay comparable with the
parent's; the choice of images depends only on the parent's ids, labels and the seed."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .. import canonical, lease, storage
from ..console import logger
from ..contracts import COL_IMAGE_ID, COL_LABEL, DatasetInfo
from ..errors import DiffmixError
from . import output, protocol, splits


@dataclass(frozen=True)
class DeriveConfig:
    parent: str
    shots: int | None = None
    imbalance_ratio: float | None = None
    seed: int = 0
    name: str | None = None
    long_tail: str | None = None  # construction for --imbalance-ratio; None = protocol.DEFAULT_LONG_TAIL
    shot_thresholds: tuple[int, int] | None = None  # (many, few); None = the parent's

    def __post_init__(self) -> None:
        object.__setattr__(self, "shot_thresholds", protocol.parse_shot_thresholds(self.shot_thresholds))

    def validate(self) -> None:
        if (self.shots is None) == (self.imbalance_ratio is None):
            raise DiffmixError("a derived dataset needs exactly one of --shots K or --imbalance-ratio R")
        if self.shots is not None and self.shots < 1:
            raise DiffmixError(f"--shots {self.shots} must be >= 1")
        if self.imbalance_ratio is not None and self.imbalance_ratio < 1:
            raise DiffmixError(f"--imbalance-ratio {self.imbalance_ratio} must be > 1 (n_max / n_min, e.g. 100)")
        if self.imbalance_ratio == 1:
            raise DiffmixError("--imbalance-ratio 1 keeps every class the same size: that is no long tail. "
                               "Pass R > 1 (the paper uses 100, 50 and 10), or --shots K for a balanced subset")
        if self.long_tail is not None:
            if self.imbalance_ratio is None:
                raise DiffmixError(f"--long-tail {self.long_tail} chooses how --imbalance-ratio builds a long "
                                   "tail and does nothing without it: pass --imbalance-ratio R, or drop --long-tail")
            if self.long_tail not in protocol.LONG_TAIL_CONSTRUCTIONS:
                raise DiffmixError(f"--long-tail {self.long_tail!r}: choose reference (the Diff-Mix code's, "
                                   "default) or geometric")


def _parent_thresholds(info: DatasetInfo) -> tuple[int, int]:
    if info.shot_thresholds:
        return info.many_few()
    return protocol.default_shot_thresholds(info.source.get("format"))  # a parent written before they existed


def _warn_about_parent(info: DatasetInfo, construction: str) -> None:
    """Say when the parent will not give the long tail the user probably expects."""
    if info.subset.get("kind") == "long-tail":
        logger.warning("%s is already long-tailed (imbalance ratio %s): a long tail of it compounds the "
                       "imbalance; derive from its parent instead", info.name, info.subset.get("imbalance_ratio"))
    carved_val = info.source.get("carved", {}).get("val")
    if construction == "reference" and carved_val:
        logger.warning("the reference builds its long tail from the whole train split (it has no val), but "
                       "%s moved %g of its train split to val, so the counts fall below the paper's "
                       "(CUB-LT100: 1,242 images from 5,994). For the paper's counts, prepare the parent "
                       "with --val-fraction 0", info.name, carved_val)


@lease.scoped  # the output has one writer while this runs, and none after
def derive(cfg: DeriveConfig, out: str, overwrite: bool = False) -> DatasetInfo:
    """Few-shot (K per class) or long-tail (imbalance ratio R) subset of a canonical dataset's train
    split; val and test are copied unchanged."""
    cfg.validate()
    out = storage.normalize(out)
    parent = canonical.open_dataset(cfg.parent)
    if storage.normalize(cfg.parent) == out:
        raise DiffmixError("--out must differ from --from: a derived dataset is a new root")
    construction = (cfg.long_tail or protocol.DEFAULT_LONG_TAIL) if cfg.imbalance_ratio is not None else None
    thresholds = cfg.shot_thresholds or _parent_thresholds(parent.info)
    # Resolved values go into the config, so spelling out a default is the same config as omitting it.
    config = dataclasses.asdict(dataclasses.replace(cfg, long_tail=construction, shot_thresholds=thresholds)) | {
        "parent": parent.uri, "parent_fingerprint": parent.info.fingerprint}
    if found := output.claim(out, config, overwrite, {"--from": cfg.parent}):
        return found
    train = parent.read_split("train")
    rows = list(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_LABEL).to_pylist()))
    if cfg.shots is not None:
        chosen, short = splits.few_shot(rows, cfg.shots, cfg.seed)
        subset = {"kind": "few-shot", "shots": cfg.shots, "seed": cfg.seed,
                  "short_classes": {str(c): n for c, n in sorted(short.items())}}
        if short:
            logger.warning("%d class(es) have fewer than %d train images; all of theirs are kept", len(short), cfg.shots)
    else:
        _warn_about_parent(parent.info, construction)
        chosen, targets, short = splits.long_tail(rows, parent.info.num_classes, cfg.imbalance_ratio, cfg.seed,
                                                  construction)
        subset = {"kind": "long-tail", "construction": construction, "imbalance_ratio": cfg.imbalance_ratio,
                  "seed": cfg.seed, "targets": targets,
                  "short_classes": {str(c): n for c, n in sorted(short.items())}}
        if short:
            logger.warning("%d class(es) have fewer train images than their long-tail target; all of theirs "
                           "are kept (listed under subset.short_classes)", len(short))
    mask = pc.is_in(train.column(COL_IMAGE_ID), value_set=pa.array(sorted(chosen), pa.string()))
    by_split = {"train": train.filter(mask)}
    for split in ("val", "test"):
        by_split[split] = parent.read_split(split)  # empty (and so left out) where the parent has none
    kept = Counter(by_split["train"].column(COL_LABEL).to_pylist())
    if cfg.shot_thresholds and (warning := protocol.one_group_warning(
            [kept[c] for c in range(parent.info.num_classes)], thresholds)):
        logger.warning("%s", warning)
    tag = f"k{cfg.shots}" if cfg.shots else f"lt{cfg.imbalance_ratio:g}"
    info = output.write(out, cfg.name or f"{parent.info.name}-{tag}", parent.info.classes, parent.info.super_class,
                        by_split, source={"uri": parent.uri, "format": "canonical"}, subset=subset,
                        skipped={"bad_files": 0, "bad": [], "ignored_files": 0, "ignored": []}, config=config,
                        parent_fingerprint=parent.info.fingerprint,
                        shot_thresholds=protocol.thresholds_record(thresholds))
    logger.info("wrote derived dataset %s: train %d of %d images", out, info.split_size("train"), train.num_rows)
    return info
