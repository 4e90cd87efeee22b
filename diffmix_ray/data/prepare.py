"""`diffmix-ray prepare`: raw dataset -> canonical dataset, and canonical -> derived subset.

Order of work, chosen so that failures leave nothing that looks complete: validate options ->
list the source (metadata errors surface before any output is touched) -> claim the output
(_run.json) -> fetch and canonicalize every image in parallel -> check bad images, duplicates,
empty classes -> carve splits -> write shards -> dataset.json last. A run that fails before
dataset.json owns nothing: the corrected rerun may take the same --out (storage.claim_output).
Derived subsets (few-shot, long-tail) are in derive.py."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import canonical, lease, storage
from ..console import logger, progress
from ..contracts import SPLITS, DatasetInfo
from ..errors import DiffmixError
from ..images import BadImage, DecodeBudget, canonicalize, decode_budget_bytes
from . import output, protocol, readers, splits
from .derive import DeriveConfig, derive

# DeriveConfig/derive are re-exported: `prepare --from` is the same command, and callers import both here.
__all__ = ["BAD_IMAGE_POLICIES", "FORMATS", "DeriveConfig", "PrepareConfig", "derive", "prepare"]

FORMATS = ("imagefolder", "cub", "flowers102", "parquet")
BAD_IMAGE_POLICIES = ("fail", "skip")
MAX_LISTED = 1000  # bad/ignored file names kept in dataset.json (all are counted)


@dataclass(frozen=True)
class PrepareConfig:
    format: str
    source: str
    super_class: str | None = None
    name: str | None = None
    val_fraction: float = 0.1  # only used when the source has no val split; 0 = no val split at all
    test_fraction: float = 0.0  # only used when the source has no test split
    seed: int = 0
    on_bad_image: str = "fail"
    image_column: str = "image"
    label_column: str = "label"
    split_column: str | None = None
    id_column: str | None = None
    class_names: tuple[str, ...] | None = None
    split: str = "official"  # flowers102 only: "reference" = the Diff-Mix code's seeded 50/50 per class
    shot_thresholds: tuple[int, int] | None = None  # (many, few); None = the format's default

    def __post_init__(self) -> None:
        object.__setattr__(self, "shot_thresholds", protocol.parse_shot_thresholds(self.shot_thresholds))

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
        if self.split not in protocol.SPLIT_PROTOCOLS:
            raise DiffmixError(f"--split {self.split!r}: choose official or reference")
        if self.split == "reference" and self.format not in protocol.REFERENCE_SPLIT_FORMATS:
            raise DiffmixError(f"--split reference is the Diff-Mix code's seeded 50/50 re-split of Flowers-102; "
                               f"--format {self.format} has no such split. Drop --split (the source's own "
                               "split is used), or use --format flowers102")

    def resolved_thresholds(self) -> tuple[int, int]:
        return self.shot_thresholds or protocol.default_shot_thresholds(self.format)


def _list_source(cfg: PrepareConfig) -> readers.RawListing:
    if cfg.format == "imagefolder":
        listing = readers.read_imagefolder(cfg.source)
    elif cfg.format == "cub":
        listing = readers.read_cub(cfg.source)
    elif cfg.format == "flowers102":
        listing = readers.read_flowers102(cfg.source, cfg.split, cfg.seed)
    else:
        listing = readers.read_parquet_table(cfg.source, cfg.image_column, cfg.label_column, cfg.split_column,
                                             cfg.id_column, list(cfg.class_names) if cfg.class_names else None)
    if cfg.class_names and cfg.format != "parquet":
        if len(cfg.class_names) != len(listing.classes):
            raise DiffmixError(f"--class-names has {len(cfg.class_names)} names but {cfg.source} has "
                               f"{len(listing.classes)} classes")
        listing.classes = list(cfg.class_names)
    _check_distinct(listing.classes, cfg.source)
    return listing


def _check_distinct(classes: list[str], source: str) -> None:
    """Class names go into prompts, and CLIP's tokenizer lower-cases and splits on spaces: names that
    differ only by case or spacing would get the very same prompt."""
    seen: dict[str, str] = {}
    for name in classes:
        key = " ".join(name.lower().split())
        if key in seen:
            raise DiffmixError(f"classes {seen[key]!r} and {name!r} in {source} differ only by case or spacing: "
                               "their prompts would be identical; rename or merge one of them")
        seen[key] = name


def _fetch_all(cfg: PrepareConfig, items: list[readers.RawItem], show_progress: bool
               ) -> tuple[list[bytes | None], list[tuple[str, str]]]:
    """Fetch and canonicalize every item in parallel; returns bytes (None where bad) and the bad list."""
    fs, _ = storage.filesystem(cfg.source)
    budget = DecodeBudget(decode_budget_bytes())  # decodes in flight share it, whatever the thread count

    local_root = None if storage.is_s3(cfg.source) else storage.normalize(cfg.source)

    def work(item: readers.RawItem) -> tuple[bytes | None, str | None]:
        try:
            raw = item.data
            if raw is None:
                path = item.where.split("://", 1)[1] if storage.is_s3(item.where) else item.where
                if local_root is not None and not readers.inside(path, local_root):
                    raise BadImage(f"a symbolic link to {os.path.realpath(path)}, outside --source: links are "
                                   "followed only inside the source; copy the file in, or remove the link")
                with storage.explained(item.where):
                    raw = fs.cat_file(path)
            return canonicalize(raw, budget)[0], None
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


def _assign_splits(rows: list[tuple[str, int, str | None]], cfg: PrepareConfig
                   ) -> tuple[dict[str, str], dict[str, float]]:
    """image_id -> split, and the fractions actually carved. Items without a split are train;
    val/test are carved (stratified, seeded) from train only where the source did not define them.
    A fraction of 0 carves nothing: that split is then absent from the dataset."""
    split_of = {image_id: (split or "train") for image_id, _, split in rows}
    present = set(split_of.values())
    fractions = {p: f for p, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction))
                 if p not in present and f > 0}
    if fractions:
        train_rows = [(i, label) for i, label, _ in rows if split_of[i] == "train"]
        split_of.update(splits.carve(train_rows, fractions, cfg.seed))
    return split_of, fractions


@lease.scoped  # the output has one writer while this runs, and none after
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
    thresholds = cfg.resolved_thresholds()
    # Resolved values go into the config, so spelling out a default is the same config as omitting it.
    config = dataclasses.asdict(dataclasses.replace(cfg, shot_thresholds=thresholds)) | {
        "super_class": super_class, "source": storage.normalize(cfg.source)}
    if found := output.claim(out, config, overwrite, {"--source": cfg.source}):
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
    split_of, carved = _assign_splits([(it.image_id, it.label, it.split) for it, _ in kept], cfg)
    train_counts = Counter(it.label for it, _ in kept if split_of[it.image_id] == "train")
    empty = [listing.classes[c] for c in range(len(listing.classes)) if train_counts[c] == 0]
    if empty:
        raise DiffmixError(f"{len(empty)} class(es) have no usable train images: {empty[:10]}; every class "
                           "needs train images (fine-tuning and the classifier learn from them)")
    if cfg.shot_thresholds and (warning := protocol.one_group_warning(
            [train_counts[c] for c in range(len(listing.classes))], thresholds)):
        logger.warning("%s", warning)

    by_split = {}
    for split in SPLITS:
        rows = sorted(((it.label, it.image_id, raw) for it, raw in kept if split_of[it.image_id] == split))
        by_split[split] = canonical.rows_table([r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows], split)
    skipped = {"bad_files": len(bad), "bad": [f"{w}: {r}" for w, r in bad[:MAX_LISTED]],
               "ignored_files": len(listing.ignored), "ignored": listing.ignored[:MAX_LISTED]}
    # `split`: whose split the source's train/val/test are; `carved`: the fractions of train this run
    # moved to val/test ({} = none: e.g. --val-fraction 0, or the source had its own val).
    source = {"uri": storage.normalize(cfg.source), "format": cfg.format, "split": cfg.split, "carved": carved}
    info = output.write(out, cfg.name or _default_name(cfg.source), listing.classes, super_class, by_split,
                        source=source, subset={}, skipped=skipped, config=config, parent_fingerprint=None,
                        shot_thresholds=protocol.thresholds_record(thresholds))
    seconds = time.perf_counter() - t0
    logger.info("wrote %d images (%s) to %s in %.1f s (%.0f images/s)", len(kept),
                ", ".join(f"{s} {info.split_size(s)}" for s in info.splits), out, seconds,
                len(kept) / max(seconds, 1e-9))
    return info


def _default_name(source: str) -> str:
    return os.path.basename(storage.normalize(source).rstrip("/")) or "dataset"
