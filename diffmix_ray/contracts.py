"""The data contracts between stages, in one place: column names, Arrow schemas, file names,
manifest fields and their validation. Every stage reads and writes through these definitions;
DESIGN.md ("Contracts") is the prose version of this module."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .errors import DiffmixError

CONTRACT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Canonical dataset: <root>/dataset.json + <root>/images/{split}-{index:05d}.parquet
# ---------------------------------------------------------------------------------------------
DATASET_JSON = "dataset.json"  # written last: its presence means the dataset is complete
IMAGES_DIR = "images"
SPLITS = ("train", "val", "test")

COL_IMAGE_ID = "image_id"
COL_IMAGE = "image"
COL_LABEL = "label"
COL_SPLIT = "split"

DATASET_SCHEMA = pa.schema(
    [
        pa.field(COL_IMAGE_ID, pa.string(), nullable=False),
        pa.field(COL_IMAGE, pa.binary(), nullable=False),  # encoded JPEG or PNG, always 8-bit RGB
        pa.field(COL_LABEL, pa.int32(), nullable=False),
        pa.field(COL_SPLIT, pa.string(), nullable=False),
    ]
)


# many/medium/few grouping of classes by train images when a dataset.json records none (written
# before `shot_thresholds` existed): CUB's in the Diff-Mix reference, this project's earlier fixed value.
DEFAULT_SHOT_THRESHOLDS = (20, 5)


def dataset_shard_name(split: str, index: int) -> str:
    """Shards are per split so a stage that may only see `train` never opens another split's file."""
    return f"{split}-{index:05d}.parquet"


@dataclass
class DatasetInfo:
    """Contents of dataset.json. `fingerprint` hashes every row (ids, image bytes, labels, splits)
    and the class list, so two datasets with the same fingerprint hold the same data."""

    name: str
    classes: list[str]
    super_class: str
    counts: dict[str, dict[str, int]]  # split -> class index (as str, JSON keys) -> count
    files: dict[str, list[str]]  # split -> shard file names under images/
    source: dict[str, Any]  # raw source URI/format, or the parent dataset for derived subsets
    subset: dict[str, Any]  # shots / imbalance ratio / seed / per-class targets; {} for full data
    skipped: dict[str, Any]  # bad images skipped (count + names) and ignored non-image files
    fingerprint: str
    parent_fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # resolved prepare options
    # Long-tail grouping of classes by train images: many = more than `many`, few = fewer than
    # `few`, medium = the rest. None in files written before it existed (readers use 20 and 5).
    shot_thresholds: dict[str, int] | None = None
    contract_version: int = CONTRACT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> list[str]:
        """The splits this dataset has, in SPLITS order. A split it lacks (no val when prepared with
        --val-fraction 0, no test for a source without one) has no entry in counts or files."""
        return [s for s in SPLITS if self.split_size(s) > 0]

    def has_split(self, split: str) -> bool:
        return self.split_size(split) > 0

    def many_few(self) -> tuple[int, int]:
        """(many, few) thresholds: many = more than `many` train images, few = fewer than `few`."""
        if self.shot_thresholds is None:
            return DEFAULT_SHOT_THRESHOLDS
        return self.shot_thresholds["many"], self.shot_thresholds["few"]

    def split_size(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())

    def class_counts(self, split: str) -> list[int]:
        per = self.counts.get(split, {})
        return [int(per.get(str(c), 0)) for c in range(self.num_classes)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = DATASET_JSON) -> "DatasetInfo":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DiffmixError(f"{where} is not valid JSON ({e}); re-run `diffmix-ray prepare`") from e
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise DiffmixError(f"{where} lacks fields {missing}; it was not written by `diffmix-ray prepare`")
        info = cls(**{k: v for k, v in raw.items() if k in names})
        info.validate(where)
        return info

    def validate(self, where: str = DATASET_JSON) -> None:
        if info_version := self.contract_version:
            if info_version > CONTRACT_VERSION:
                raise DiffmixError(f"{where} has contract version {info_version}, newer than this "
                                   f"diffmix-ray ({CONTRACT_VERSION}); upgrade diffmix-ray")
        if not self.classes:
            raise DiffmixError(f"{where} lists no classes")
        if len(set(self.classes)) != len(self.classes):
            raise DiffmixError(f"{where} lists duplicate class names")
        for split in self.counts:
            if split not in SPLITS:
                raise DiffmixError(f"{where}: unknown split {split!r} (expected one of {SPLITS})")
            for c in self.counts[split]:
                if not 0 <= int(c) < self.num_classes:
                    raise DiffmixError(f"{where}: class index {c} out of range 0..{self.num_classes - 1}")
        if self.shot_thresholds is not None:
            many, few = self.shot_thresholds.get("many"), self.shot_thresholds.get("few")
            if not (isinstance(many, int) and isinstance(few, int) and 0 <= few < many):
                raise DiffmixError(f"{where}: shot_thresholds {self.shot_thresholds} must be "
                                   "{\"many\": M, \"few\": F} with whole numbers M > F >= 0")


# ---------------------------------------------------------------------------------------------
# Run ownership: every stage output directory carries _run.json, written before any data, so a
# rerun can tell "same config, resume" from "a different run lives here, refuse".
# ---------------------------------------------------------------------------------------------
RUN_JSON = "_run.json"
LEASE_JSON = "_lease.json"  # the one writer of an output (lease.py); gone when it is done
SUCCESS = "_SUCCESS"
# Written by a training run's rank 0 when its loss or weights turned non-finite: the run stops and the
# driver raises this file's message (Ray Train's result carries only checkpointed metrics).
DIVERGED = "_diverged.txt"

# ---------------------------------------------------------------------------------------------
# Concept bank (finetune -> generate)
# ---------------------------------------------------------------------------------------------
CONCEPTS_JSON = "concepts.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LEARNED_EMBEDS = "learned_embeds.safetensors"
PLACEHOLDER_TEMPLATE = "<class_{index}>"
DEFAULT_PROMPT_TEMPLATE = "a photo of a {token} {super_class}"

# ---------------------------------------------------------------------------------------------
# Pair plan and synthetic shards (generate -> train-cls)
# ---------------------------------------------------------------------------------------------
PLAN_DIR = "plan"
SHARDS_DIR = "shards"
MANIFEST_JSON = "manifest.json"

COL_PAIR_ID = "pair_id"
COL_SOURCE_ID = "source_id"
COL_SOURCE_LABEL = "source_label"
COL_TARGET_LABEL = "target_label"
COL_STRENGTH = "strength"
COL_SEED = "seed"
COL_MODE = "mode"
COL_WIDTH = "width"
COL_HEIGHT = "height"
COL_PROMPT = "prompt"

PLAN_SCHEMA = pa.schema(
    [
        pa.field(COL_PAIR_ID, pa.string(), nullable=False),
        pa.field(COL_SOURCE_ID, pa.string(), nullable=True),  # null for text-to-image modes
        pa.field(COL_SOURCE_LABEL, pa.int32(), nullable=False),
        pa.field(COL_TARGET_LABEL, pa.int32(), nullable=False),
        pa.field(COL_STRENGTH, pa.float32(), nullable=False),
        pa.field(COL_SEED, pa.int64(), nullable=False),
        pa.field(COL_MODE, pa.string(), nullable=False),
    ]
)

SHARD_SCHEMA = pa.schema(
    list(PLAN_SCHEMA)
    + [
        pa.field(COL_IMAGE, pa.binary(), nullable=False),  # JPEG
        pa.field(COL_WIDTH, pa.int32(), nullable=False),
        pa.field(COL_HEIGHT, pa.int32(), nullable=False),
        pa.field(COL_PROMPT, pa.string(), nullable=False),
    ]
)


def check_columns(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise naming every missing column or wrong type; extra columns are allowed."""
    problems = []
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r}")
        elif not schema.field(idx).type.equals(f.type):
            problems.append(f"column {f.name!r} has type {schema.field(idx).type}, expected {f.type}")
    if problems:
        raise DiffmixError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Scores (score -> train-cls, report): <synthetic>/scores/<name>/*.parquet, manifest.json,
# failed/*.json (only while pairs fail), _SUCCESS (last). One row per pair_id of the shards; the
# shards themselves are never rewritten.
# ---------------------------------------------------------------------------------------------
SCORES_DIR = "scores"
DEFAULT_SCORES_NAME = "default"
SCORES_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a name is one folder under scores/ (score --name, train-cls --scores)
SCORES_VERSION = 1  # of the columns' definitions below: part of a scores run's identity

# Zero-shot CLIP over all C classes: softmax(logit_scale * cos(image, prompt_c)), kept at two classes.
CLASS_PROMPT = "a photo of a {class_name} {super_class}"
# The Diff-Mix reference's object filter (scripts/filter_syn_data.py): P(with) of softmax over the two.
OBJECT_PROMPTS = ("a photo with {article} {super_class} on it", "a photo without {article} {super_class} on it")

COL_CLIP_TARGET_PROB = "clip_target_prob"  # zero-shot probability of the target class
COL_CLIP_SOURCE_PROB = "clip_source_prob"  # ... of the source class
COL_CLIP_TARGET_SIM = "clip_target_sim"  # cosine similarity, image vs the target class's prompt
COL_CLIP_SOURCE_SIM = "clip_source_sim"  # ... vs the source class's prompt
COL_CLIP_OBJECT_PROB = "clip_object_prob"  # the reference's object score: P("with a {super_class}")
COL_CLIP_IMAGE_SIM = "clip_source_image_sim"  # cosine similarity of the synthetic and source image embeddings
COL_CLASSIFIER_TARGET_PROB = "classifier_target_prob"  # softmax probability of the target class (--classifier)
COL_CLASSIFIER_SOURCE_PROB = "classifier_source_prob"  # ... of the source class

# (column, nullable): the image similarity is null for text-to-image pairs (no source image), the
# classifier's columns when no classifier was given.
_SCORE_FIELDS = ((COL_CLIP_TARGET_PROB, False), (COL_CLIP_SOURCE_PROB, False), (COL_CLIP_TARGET_SIM, False),
                 (COL_CLIP_SOURCE_SIM, False), (COL_CLIP_OBJECT_PROB, False), (COL_CLIP_IMAGE_SIM, True),
                 (COL_CLASSIFIER_TARGET_PROB, True), (COL_CLASSIFIER_SOURCE_PROB, True))
SCORE_COLUMNS = tuple(name for name, _ in _SCORE_FIELDS)  # the float columns a filter may name

SCORES_SCHEMA = pa.schema(
    [
        pa.field(COL_PAIR_ID, pa.string(), nullable=False),
        pa.field(COL_SOURCE_LABEL, pa.int32(), nullable=False),  # copied from the shard row, so filters
        pa.field(COL_TARGET_LABEL, pa.int32(), nullable=False),  # per class need no join
    ]
    + [pa.field(name, pa.float32(), nullable=nullable) for name, nullable in _SCORE_FIELDS]
)


def object_prompts(super_class: str) -> tuple[str, str]:
    """The object-score prompts for `super_class`, with its article ("an aircraft", as the reference)."""
    article = "an" if super_class[:1].lower() in tuple("aeiou") else "a"
    return tuple(p.format(article=article, super_class=super_class) for p in OBJECT_PROMPTS)


# ---------------------------------------------------------------------------------------------
# Classifier run (train-cls): the val-selected weights `evaluate` and `score --classifier` load.
# classify/loop.py writes them (<run>/best/model.pt: a timm state_dict; model.json: arch,
# num_classes, epoch, val_top1, data_cfg {img_size, mean, std, interpolation, crop_pct},
# dataset_fingerprint); <run>/_SUCCESS marks the run finished.
# ---------------------------------------------------------------------------------------------
CLASSIFIER_BEST_DIR = "best"
CLASSIFIER_MODEL_JSON = "model.json"
CLASSIFIER_WEIGHTS = "model.pt"
