"""Soft labels and the per-epoch real/synthetic mixing plan: plain numpy, no Ray, unit-tested."""

from __future__ import annotations

import numpy as np

KIND_REAL, KIND_SYNTHETIC = 0, 1


def soft_labels(source: np.ndarray, target: np.ndarray, strength: np.ndarray, gamma: float,
                num_classes: int) -> np.ndarray:
    """Diff-Mix: y = (1 - s^gamma) onehot(source) + s^gamma onehot(target). Real rows have s = 0;
    intra-class and text-to-image rows have source == target, so they come out one-hot."""
    n = len(source)
    w = np.power(np.asarray(strength, dtype=np.float64), gamma)
    y = np.zeros((n, num_classes), dtype=np.float32)
    rows = np.arange(n)
    np.add.at(y, (rows, np.asarray(source)), (1.0 - w).astype(np.float32))
    np.add.at(y, (rows, np.asarray(target)), w.astype(np.float32))
    return y


def smooth(y: np.ndarray, epsilon: float) -> np.ndarray:
    """Label smoothing on (soft) targets: (1 - eps) y + eps / C."""
    return (1.0 - epsilon) * y + epsilon / y.shape[1]


def inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """Class weights ∝ 1 / (n_c + 1), normalised (long-tail synthetic target sampling)."""
    w = 1.0 / (np.asarray(counts, dtype=np.float64) + 1.0)
    return w / w.sum()


def synthetic_row_weights(targets: np.ndarray, num_classes: int, sampling: str, real_counts: np.ndarray) -> np.ndarray:
    """Probability of drawing each synthetic row: uniform over rows, or (inverse-frequency) a
    target class ∝ 1/(n_c + 1) first, then a row of that class uniformly."""
    if sampling == "uniform":
        return np.full(len(targets), 1.0 / len(targets))
    per_class = np.bincount(targets, minlength=num_classes).astype(np.float64)
    class_w = inverse_frequency(real_counts)
    class_w = np.where(per_class > 0, class_w, 0.0)
    class_w /= class_w.sum()
    w = class_w[targets] / per_class[targets]
    return w / w.sum()


def own_index(real_ids: list[str], source_ids: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each real image's own translations, as (start, rows): real image i's synthetic rows are
    rows[start[i]:start[i + 1]] (in synthetic-row order). Rows without a source (text-to-image) or
    whose source is not a train image belong to no one."""
    position = {image_id: i for i, image_id in enumerate(real_ids)}
    owner = np.array([position.get(s, -1) if s is not None else -1 for s in source_ids], dtype=np.int64)
    rows = np.flatnonzero(owner >= 0)
    rows = rows[np.argsort(owner[rows], kind="stable")]
    start = np.zeros(len(real_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[owner >= 0], minlength=len(real_ids)), out=start[1:])
    return start, rows


def minority_weights(labels: np.ndarray, counts) -> np.ndarray:
    """Per real row, the probability of drawing it ∝ 1/n_c of its class (CMO's minority sampler: the
    reference's WeightedRandomSampler with class weights 1/n_c), normalised."""
    w = 1.0 / np.asarray(counts, dtype=np.float64)[np.asarray(labels)]
    return w / w.sum()


def epoch_mix(num_real: int, num_synthetic: int, p: float, syn_weights: np.ndarray | None, seed: int,
              epoch: int, own: tuple[np.ndarray, np.ndarray] | None = None,
              real_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For one epoch: a shuffled order of the real rows and, per position, the synthetic row that
    replaces it (-1 = keep the real one). Deterministic from (seed, epoch). The epoch length is the
    number of real images, as in the reference. Replacements come from the whole pool (Diff-Mix,
    drawn by `syn_weights`) or, with `own` (own_index), from the real image's own translations,
    uniformly (DA-Fusion); an image without any stays real. With `real_weights` the real rows are
    drawn N times with replacement by those weights instead (CMO's minority stream, from a seeded
    stream of its own), and replaced as the main stream's are (the reference's minority loader reads
    the same real/synthetic-mixed training set)."""
    if real_weights is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xC1A5]))
        order = rng.permutation(num_real)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xC30]))
        order = rng.choice(num_real, size=num_real, replace=True, p=real_weights)
    replace = np.full(num_real, -1, dtype=np.int64)
    if num_synthetic and p > 0:
        hit = rng.random(num_real) < p
        if own is None:
            replace[hit] = rng.choice(num_synthetic, size=int(hit.sum()), p=syn_weights)
        else:
            start, rows = own
            first, count = start[order], start[order + 1] - start[order]
            pick = first + np.floor(rng.random(num_real) * count).astype(np.int64)
            take = hit & (count > 0)
            replace[take] = rows[pick[take]]
    return order, replace
