"""`diffmix-ray prepare`: raw dataset -> canonical dataset, and canonical -> derived subset.

Order of work, chosen so that failures leave nothing that looks complete: validate options ->
list the source (metadata errors surface before any output is touched) -> claim the output
(_run.json) -> fetch and canonicalize every image in parallel -> check bad images, duplicates,
empty classes -> carve splits -> write shards -> dataset.json last."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .. import canonical, storage
from ..console import logger, progress
from ..contracts import (COL_IMAGE, COL_IMAGE_ID, COL_LABEL, DATASET_JSON, IMAGES_DIR, SPLITS, DatasetInfo)
from ..errors import DiffmixError
from . import readers, splits
from ..images import BadImage, canonicalize

FORMATS = ("imagefolder", "cub", "flowers102", "parquet")
BAD_IMAGE_POLICIES = ("fail", "skip")
MAX_LISTED = 1000  # bad/ignored file names kept in dataset.json (all are counted)


@dataclass(frozen=True)
class PrepareConfig:
    format: str
    source: str
    super_class: str | None = None
    name: str | None = None
    val_fraction: float = 0.1  # only used when the source has no val split
    test_fraction: float = 0.0  # only used when the source has no test split
    seed: int = 0
    on_bad_image: str = "fail"
    image_column: str = "image"
    label_column: str = "label"
    split_column: str | None = None
    id_column: str | None = None
    class_names: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise DiffmixError(f"--format {self.format!r} is not supported; choose one of {', '.join(FORMATS)}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise DiffmixError(f"--on-bad-image {self.on_bad_image!r}: choose fail or skip")
        for flag, value in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise DiffmixError(f"{flag} {value} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DiffmixError("--val-fraction + --test-fraction must leave some images for train")


@dataclass(frozen=True)
class DeriveConfig:
    parent: str
    shots: int | None = None
    imbalance_ratio: float | None = None
    seed: int = 0
    name: str | None = None

    def validate(self) -> None:
        if (self.shots is None) == (self.imbalance_ratio is None):
            raise DiffmixError("a derived dataset needs exactly one of --shots K or --imbalance-ratio R")
        if self.shots is not None and self.shots < 1:
            raise DiffmixError(f"--shots {self.shots} must be >= 1")
        if self.imbalance_ratio is not None and self.imbalance_ratio < 1:
            raise DiffmixError(f"--imbalance-ratio {self.imbalance_ratio} must be >= 1 (n_max / n_min)")


def _list_source(cfg: PrepareConfig) -> readers.RawListing:
    if cfg.format == "imagefolder":
        listing = readers.read_imagefolder(cfg.source)
    elif cfg.format == "cub":
        listing = readers.read_cub(cfg.source)
    elif cfg.format == "flowers102":
        listing = readers.read_flowers102(cfg.source)
    else:
        listing = readers.read_parquet_table(cfg.source, cfg.image_column, cfg.label_column, cfg.split_column,
                                             cfg.id_column, list(cfg.class_names) if cfg.class_names else None)
    if cfg.class_names and cfg.format != "parquet":
        if len(cfg.class_names) != len(listing.classes):
            raise DiffmixError(f"--class-names has {len(cfg.class_names)} names but {cfg.source} has "
                               f"{len(listing.classes)} classes")
        listing.classes = list(cfg.class_names)
    return listing


def _fetch_all(cfg: PrepareConfig, items: list[readers.RawItem], show_progress: bool
               ) -> tuple[list[bytes | None], list[tuple[str, str]]]:
    """Fetch and canonicalize every item in parallel; returns bytes (None where bad) and the bad list."""
    fs, _ = storage.filesystem(cfg.source)

    def work(item: readers.RawItem) -> tuple[bytes | None, str | None]:
        try:
            raw = item.data
            if raw is None:
                path = item.where.split("://", 1)[1] if storage.is_s3(item.where) else item.where
                with storage.explained(item.where):
                    raw = fs.cat_file(path)
            return canonicalize(raw)[0], None
        except BadImage as e:
            return None, str(e)

    # Threads, not processes: S3 reads are I/O bound and PIL releases the GIL while decoding.
    workers = 32 if storage.is_s3(cfg.source) else max(2, (os.cpu_count() or 2) * 2)
    results: list[bytes | None] = []
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(workers) as pool, progress("canonicalizing images", len(items), show_progress) as advance:
        for item, (data, reason) in zip(items, pool.map(work, items)):
            results.append(data)
            if reason is not None:
                bad.append((item.where, reason))
            advance()
    return results, bad


def _bad_report(bad: list[tuple[str, str]]) -> str:
    lines = [f"  {where}: {reason}" for where, reason in bad]
    return "\n".join(lines)


def _assign_splits(rows: list[tuple[str, int, str | None]], cfg: PrepareConfig) -> dict[str, str]:
    """image_id -> split. Items without a split are train; val/test are carved (stratified, seeded)
    from train only where the source did not define them."""
    split_of = {image_id: (split or "train") for image_id, _, split in rows}
    present = set(split_of.values())
    fractions = {p: f for p, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction))
                 if p not in present and f > 0}
    if fractions:
        train_rows = [(i, label) for i, label, _ in rows if split_of[i] == "train"]
        split_of.update(splits.carve(train_rows, fractions, cfg.seed))
    return split_of


def _write(out: str, name: str, classes: list[str], super_class: str, by_split: dict[str, pa.Table],
           source: dict, subset: dict, skipped: dict, config: dict, parent_fingerprint: str | None) -> DatasetInfo:
    storage.remove_tree(storage.join(out, IMAGES_DIR))  # leftovers of an interrupted attempt
    files, counts, digests = {}, {}, []
    for split in SPLITS:
        table = by_split.get(split)
        if table is None or table.num_rows == 0:
            continue
        files[split] = canonical.write_split_shards(out, split, table)
        labels = table.column(COL_LABEL).to_pylist()
        counts[split] = {str(c): n for c, n in sorted(Counter(labels).items())}
        digests += [canonical.row_digest(i, img, lab, split) for i, img, lab in
                    zip(table.column(COL_IMAGE_ID).to_pylist(), table.column(COL_IMAGE).to_pylist(), labels)]
    info = DatasetInfo(name=name, classes=classes, super_class=super_class, counts=counts, files=files,
                       source=source, subset=subset, skipped=skipped,
                       fingerprint=canonical.fingerprint(classes, digests),
                       parent_fingerprint=parent_fingerprint, config=config)
    info.validate()
    storage.write_text_atomic(storage.join(out, DATASET_JSON), info.to_json())  # the commit point
    return info


def _existing(out: str, resumed: bool) -> DatasetInfo | None:
    meta = storage.join(out, DATASET_JSON)
    if resumed and storage.exists(meta):
        logger.info("%s already holds this dataset (same config); nothing to do", out)
        return DatasetInfo.from_json(storage.read_text(meta), where=meta)
    return None


def prepare(cfg: PrepareConfig, out: str, overwrite: bool = False, show_progress: bool = True) -> DatasetInfo:
    cfg.validate()
    out = storage.normalize(out)
    storage.check_bucket(cfg.source)
    t0 = time.perf_counter()
    listing = _list_source(cfg)
    super_class = cfg.super_class if cfg.super_class is not None else listing.default_super_class
    if super_class is None:
        raise DiffmixError(f"--super-class is required for --format {cfg.format}: the word prompts use "
                           "for every class, e.g. 'bird' in 'a photo of a <class> bird'")
    config = dataclasses.asdict(cfg) | {"super_class": super_class, "source": storage.normalize(cfg.source)}
    if found := _existing(out, storage.claim_output(out, "prepare", config, overwrite)):
        return found
    logger.info("listed %d images in %d classes from %s", len(listing.items), len(listing.classes), cfg.source)

    data, bad = _fetch_all(cfg, listing.items, show_progress)
    bad = listing.bad + bad
    if bad and cfg.on_bad_image == "fail":
        raise DiffmixError(f"{len(bad)} bad file(s) in {cfg.source}:\n{_bad_report(bad)}\n"
                           "Fix or remove them, or pass --on-bad-image skip to leave them out (they are "
                           "counted in dataset.json)")
    if bad:
        logger.warning("skipping %d bad file(s):\n%s", len(bad), _bad_report(bad[:20]))
    kept = [(item, raw) for item, raw in zip(listing.items, data) if raw is not None]

    dupes = [i for i, n in Counter(item.image_id for item, _ in kept).items() if n > 1]
    if dupes:
        where = {i: [it.where for it, _ in kept if it.image_id == i] for i in dupes[:10]}
        raise DiffmixError(f"{len(dupes)} duplicate image id(s) in {cfg.source}, e.g. "
                           + "; ".join(f"{i!r} at {w}" for i, w in where.items())
                           + ". Image ids must be unique: fix the id column or the metadata")
    split_of = _assign_splits([(it.image_id, it.label, it.split) for it, _ in kept], cfg)
    train_counts = Counter(it.label for it, _ in kept if split_of[it.image_id] == "train")
    empty = [listing.classes[c] for c in range(len(listing.classes)) if train_counts[c] == 0]
    if empty:
        raise DiffmixError(f"{len(empty)} class(es) have no usable train images: {empty[:10]}; every class "
                           "needs train images (fine-tuning and the classifier learn from them)")

    by_split = {}
    for split in SPLITS:
        rows = sorted(((it.label, it.image_id, raw) for it, raw in kept if split_of[it.image_id] == split))
        by_split[split] = canonical.rows_table([r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows], split)
    skipped = {"bad_files": len(bad), "bad": [f"{w}: {r}" for w, r in bad[:MAX_LISTED]],
               "ignored_files": len(listing.ignored), "ignored": listing.ignored[:MAX_LISTED]}
    info = _write(out, cfg.name or _default_name(cfg.source), listing.classes, super_class, by_split,
                  source={"uri": storage.normalize(cfg.source), "format": cfg.format}, subset={},
                  skipped=skipped, config=config, parent_fingerprint=None)
    seconds = time.perf_counter() - t0
    logger.info("wrote %d images (%s) to %s in %.1f s (%.0f images/s)", len(kept),
                ", ".join(f"{s} {info.split_size(s)}" for s in SPLITS if s in info.counts), out, seconds,
                len(kept) / max(seconds, 1e-9))
    return info


def _default_name(source: str) -> str:
    return os.path.basename(storage.normalize(source).rstrip("/")) or "dataset"


def derive(cfg: DeriveConfig, out: str, overwrite: bool = False) -> DatasetInfo:
    """Few-shot (K per class) or long-tail (imbalance ratio R) subset of a canonical dataset's train
    split; val and test are copied unchanged, so results stay comparable with the parent's."""
    cfg.validate()
    out = storage.normalize(out)
    parent = canonical.open_dataset(cfg.parent)
    if storage.normalize(cfg.parent) == out:
        raise DiffmixError("--out must differ from --from: a derived dataset is a new root")
    config = dataclasses.asdict(cfg) | {"parent": parent.uri, "parent_fingerprint": parent.info.fingerprint}
    if found := _existing(out, storage.claim_output(out, "prepare", config, overwrite)):
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
        chosen, targets = splits.long_tail(rows, parent.info.num_classes, cfg.imbalance_ratio, cfg.seed)
        subset = {"kind": "long-tail", "imbalance_ratio": cfg.imbalance_ratio, "seed": cfg.seed,
                  "targets": targets}
    mask = pc.is_in(train.column(COL_IMAGE_ID), value_set=pa.array(sorted(chosen), pa.string()))
    by_split = {"train": train.filter(mask)}
    for split in ("val", "test"):
        by_split[split] = parent.read_split(split)
    info = _write(out, cfg.name or f"{parent.info.name}-{'k%d' % cfg.shots if cfg.shots else 'lt%g' % cfg.imbalance_ratio}",
                  parent.info.classes, parent.info.super_class, by_split,
                  source={"uri": parent.uri, "format": "canonical"}, subset=subset,
                  skipped={"bad_files": 0, "bad": [], "ignored_files": 0, "ignored": []}, config=config,
                  parent_fingerprint=parent.info.fingerprint)
    logger.info("wrote derived dataset %s: train %d of %d images", out, info.split_size("train"), train.num_rows)
    return info
