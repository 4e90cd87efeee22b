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


def epoch_mix(num_real: int, num_synthetic: int, p: float, syn_weights: np.ndarray | None, seed: int,
              epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """For one epoch: a shuffled order of the real rows and, per position, the synthetic row that
    replaces it (-1 = keep the real one). Deterministic from (seed, epoch). The epoch length is the
    number of real images, as in the reference."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xC1A5]))
    order = rng.permutation(num_real)
    replace = np.full(num_real, -1, dtype=np.int64)
    if num_synthetic and p > 0:
        hit = rng.random(num_real) < p
        replace[hit] = rng.choice(num_synthetic, size=int(hit.sum()), p=syn_weights)
    return order, replace
