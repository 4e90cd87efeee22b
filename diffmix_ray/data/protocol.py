"""The dataset-protocol choices `prepare` offers and records: which split of Flowers-102, how a
long tail is built, and the many/medium/few thresholds long-tail results are grouped by.

The defaults follow the Diff-Mix paper's code where it defines one (research/diffmix-method.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from ..contracts import DEFAULT_SHOT_THRESHOLDS
from ..errors import DiffmixError

# "official": the source's own split. "reference": the Diff-Mix code's seeded 50/50 per class over
# every image; only Flowers-102 has one (its code re-splits Flowers and no other dataset).
SPLIT_PROTOCOLS = ("official", "reference")
REFERENCE_SPLIT_FORMATS = ("flowers102",)

# "reference": the Diff-Mix code's construction, the one its long-tail tables were made with;
# "geometric": this project's earlier construction, kept so datasets built with it can be rebuilt.
LONG_TAIL_CONSTRUCTIONS = ("reference", "geometric")
DEFAULT_LONG_TAIL = "reference"

# many = more than MANY train images, few = fewer than FEW, medium = the rest. The reference reports
# CUB with (20, 5) and Flowers with (30, 10); any other dataset gets CUB's.
SHOT_THRESHOLDS_BY_FORMAT = {"flowers102": (30, 10)}


def parse_shot_thresholds(value: Any) -> tuple[int, int] | None:
    """'20,5', [20, 5] or (20, 5) -> (20, 5); None stays None (use the dataset's default)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        many, few = (int(p) for p in parts)
        if any(isinstance(p, float) and p != int(p) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise DiffmixError(f"--shot-thresholds {value!r} must be two whole numbers MANY,FEW, e.g. 20,5 "
                           "(many = more than MANY train images, few = fewer than FEW)") from None
    if few < 0:
        raise DiffmixError(f"--shot-thresholds {many},{few}: FEW must be >= 0 (few = fewer than FEW train images)")
    if many <= few:
        raise DiffmixError(f"--shot-thresholds {many},{few} is out of order: give MANY first, larger than FEW, "
                           "e.g. 20,5 (many = more than MANY train images, few = fewer than FEW)")
    return many, few


def default_shot_thresholds(source_format: str | None) -> tuple[int, int]:
    return SHOT_THRESHOLDS_BY_FORMAT.get(source_format or "", DEFAULT_SHOT_THRESHOLDS)


def thresholds_record(thresholds: tuple[int, int]) -> dict[str, int]:
    """The dataset.json form, named so a reader cannot swap the two numbers."""
    return {"many": int(thresholds[0]), "few": int(thresholds[1])}


def shot_group(n: int, thresholds: tuple[int, int]) -> str:
    many, few = thresholds
    return "many" if n > many else "few" if n < few else "medium"


def one_group_warning(train_counts: Sequence[int], thresholds: tuple[int, int]) -> str | None:
    """A message when the thresholds put every class in one group (they would separate nothing),
    e.g. thresholds given for a balanced dataset; None otherwise."""
    groups = Counter(shot_group(n, thresholds) for n in train_counts)
    if len(groups) != 1:
        return None
    (group,) = groups
    return (f"--shot-thresholds {thresholds[0]},{thresholds[1]} put all {len(train_counts)} classes in "
            f"'{group}' (train images per class: {min(train_counts)}..{max(train_counts)}): many/medium/few "
            "only separate classes of a long-tailed train split; they are recorded anyway")


# The help of the options `prepare` and `prepare --from` share (PrepareConfig, DeriveConfig).
SEED_HELP = "Seed for split carving, the Flowers-102 reference split and subsets (default 0)."
NAME_HELP = "Dataset name recorded in dataset.json."
SHOT_THRESHOLDS_HELP = ("MANY,FEW: many = more than MANY train images, few = fewer than FEW; default flowers102 30,10, "
                        "others 20,5 (derived: the parent's). Recorded in dataset.json.")

