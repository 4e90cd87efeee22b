"""Deterministic, stratified split carving and subsetting (few-shot, long-tail).

Every function takes rows as (image_id, label) pairs and a seed and returns chosen image_ids;
the choice depends only on the ids, labels and seed (never on input order or on the machine)."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Iterable

import numpy as np

from ..errors import DiffmixError


def _rng(seed: int, *tags: object) -> np.random.Generator:
    # A fresh generator per (seed, purpose, class): adding a class or a purpose never shifts the
    # random stream of another one.
    digest = hashlib.sha256(repr((seed,) + tags).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def by_class(rows: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for image_id, label in rows:
        groups[label].append(image_id)
    return {c: sorted(ids) for c, ids in sorted(groups.items())}


def carve(rows: Iterable[tuple[str, int]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Stratified carving: for each class, max(1, round(f * n_c)) ids go to each named split (in
    the order given), always leaving >= 1 id in train. Returns image_id -> split for carved ids."""
    for purpose, fraction in fractions.items():
        if not 0.0 <= fraction < 1.0:
            raise DiffmixError(f"--{purpose}-fraction {fraction} must be in [0, 1)")
    chosen: dict[str, str] = {}
    for label, ids in by_class(rows).items():
        order = [ids[i] for i in _rng(seed, "carve", label).permutation(len(ids))]
        start = 0
        for purpose, fraction in fractions.items():
            # At least one per class when asked for any: a class absent from val cannot be scored.
            wanted = max(1, int(round(fraction * len(ids)))) if fraction > 0 else 0
            n = min(wanted, len(ids) - 1 - start)
            chosen.update((i, purpose) for i in order[start:start + max(n, 0)])
            start += max(n, 0)
    return chosen


def few_shot(rows: Iterable[tuple[str, int]], shots: int, seed: int) -> tuple[set[str], dict[int, int]]:
    """K ids per class (all of them where a class has fewer). Returns ids and the per-class
    shortfall (class -> images it lacked), which `prepare` reports."""
    if shots < 1:
        raise DiffmixError(f"--shots {shots} must be >= 1")
    chosen: set[str] = set()
    short: dict[int, int] = {}
    for label, ids in by_class(rows).items():
        order = _rng(seed, "shots", label).permutation(len(ids))
        chosen.update(ids[i] for i in order[:shots])
        if len(ids) < shots:
            short[label] = shots - len(ids)
    return chosen, short


def reference_halves(class_ids: list[list[str]], seed: int) -> dict[str, str]:
    """The Diff-Mix code's Flowers-102 split, call for call, so the same seed gives the same images:
    one np.random.default_rng(seed) is consumed class by class in label order; each class's ids (in
    file order) are permuted and the first int(0.5 * n) of the permutation are train, the rest test.
    Unlike the other functions here, classes share one stream: that is what the reference does."""
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for ids in class_ids:
        perm = rng.permutation(len(ids))
        cut = int(0.5 * len(ids))
        split_of.update((ids[i], "train") for i in perm[:cut])
        split_of.update((ids[i], "test") for i in perm[cut:])
    return split_of


def long_tail_targets(num_classes: int, n_max: int, ratio: float, seed: int) -> list[int]:
    """"geometric": n_i = floor(n_max * R^(-rank_i / (C-1))), >= 1, where rank_i is the class's
    position in a seeded random order (so which classes are rare depends on the seed)."""
    if ratio < 1.0:
        raise DiffmixError(f"--imbalance-ratio {ratio} must be >= 1 (it is n_max / n_min, e.g. 100)")
    order = _rng(seed, "long-tail-order").permutation(num_classes)
    targets = [0] * num_classes
    for rank, label in enumerate(order):
        exponent = rank / (num_classes - 1) if num_classes > 1 else 0.0
        targets[int(label)] = max(1, math.floor(n_max * ratio ** (-exponent) + 1e-9))
    return targets


def reference_long_tail_targets(class_sizes: list[int], ratio: float) -> list[int]:
    """"reference" (the Diff-Mix code's gen_imbalanced_data): avg = N / C over the train split;
    classes ranked by size, largest first, ties in label order (its stable sort over labels in
    order); the class at rank i keeps max(1, int(avg * IF^(i / (C - 2)))) with IF = 1 / R. The last
    rank's exponent exceeds 1, so its target falls below avg / R: kept, as the reference has it."""
    num_classes = len(class_sizes)
    if num_classes < 3:
        raise DiffmixError(f"--long-tail reference needs at least 3 classes (its exponent divides by C - 2); "
                           f"this dataset has {num_classes}: use --long-tail geometric")
    avg = sum(class_sizes) / num_classes
    factor = 1.0 / ratio  # the reference takes IF = 0.01 for R = 100; 1/R is the same double
    order = sorted(range(num_classes), key=lambda c: -class_sizes[c])
    targets = [0] * num_classes
    for rank, label in enumerate(order):
        targets[label] = max(int(avg * factor ** (rank / (num_classes - 2.0))), 1)
    return targets


def long_tail(rows: Iterable[tuple[str, int]], num_classes: int, ratio: float, seed: int,
              construction: str = "reference") -> tuple[set[str], list[int], dict[int, int]]:
    """Subsample each class to its long-tail target. Returns the ids, the targets, and the classes
    with fewer images than their target (class -> images lacking; they keep all theirs)."""
    groups = by_class(rows)
    sizes = [len(groups.get(c, [])) for c in range(num_classes)]
    if construction == "reference":
        targets = reference_long_tail_targets(sizes, ratio)
    elif construction == "geometric":
        targets = long_tail_targets(num_classes, max(sizes, default=0), ratio, seed)
    else:
        raise DiffmixError(f"--long-tail {construction!r}: choose reference or geometric")
    chosen: set[str] = set()
    for label, ids in groups.items():
        # Which images a class keeps is seeded per class (the reference draws them with Python's
        # global random.sample, whose stream depends on its row order: not reproducible here).
        order = _rng(seed, "long-tail", label).permutation(len(ids))
        chosen.update(ids[i] for i in order[: targets[label]])
    short = {c: t - n for c, (t, n) in enumerate(zip(targets, sizes)) if t > n}
    return chosen, targets, short
