"""Which train images each fine-tuning step uses: a pure function of (seed, step, rank), so a run is
deterministic per seed and a resume from step k takes exactly the images an uninterrupted run
would have taken at steps k+1, k+2, ... (plain numpy, no Ray, no torch).

An epoch is N draws (N = train images), as the reference's sampler has (`num_samples =
len(dataset)`); it is cut into global batches of batch_size x world, the incomplete last one
dropped, and rank r takes its slice of each. Within an epoch the order is:
  * uniform: a seeded permutation (every image once);
  * class-balanced: N draws with replacement, an image of class c with probability ∝ 1/n_c, so
    every class is drawn N/C times in expectation (the reference's WeightedRandomSampler,
    `get_weighted_sampler`), instead of integer repeats that gave 19-36 images per class per
    epoch on CUB-LT100.

`PerClassSampler` (token_schedule per-class, DA-Fusion's banks) gives every step one class instead:
the whole global batch is that class's images, as in DA-Fusion's separate per-class runs."""

from __future__ import annotations

import numpy as np

_ORDER_TAG = 0xF17E  # separates these streams from other seeded streams of the same seed
_AUGMENT_TAG = 0xA06
_CLASS_ORDER_TAG = 0xC1A55
_CLASS_IMAGES_TAG = 0x1A6E5


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image probability ∝ 1/n_c of its class, normalised: each present class totals 1/C'."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = 1.0 / counts[labels]
    return w / w.sum()


class StepSampler:
    def __init__(self, labels, num_classes: int, class_balanced: bool, seed: int, batch_size: int, world: int = 1):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_balanced, self.seed = class_balanced, seed
        self.batch_size, self.world = batch_size, world
        self.weights = balanced_weights(self.labels, num_classes) if class_balanced else None
        self.steps_per_epoch = len(self.labels) // (batch_size * world)
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of the epoch's N draws, in order (the same for every rank)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _ORDER_TAG]))
        n = len(self.labels)
        order = rng.choice(n, size=n, replace=True, p=self.weights) if self.class_balanced else rng.permutation(n)
        self._cached = (epoch, order)
        return order

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, slot within it) of a step; steps count from 1, as the training loop's."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        return divmod(step - 1, self.steps_per_epoch)

    def indices(self, step: int, rank: int) -> np.ndarray:
        """Rows of the train split rank `rank` trains on at `step`."""
        epoch, slot = self.position(step)
        start = slot * self.batch_size * self.world + rank * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def augment_rng(self, step: int, rank: int) -> np.random.Generator:
        """The crop/flip randomness of one batch, so a resumed step sees the same pixels too."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, step, rank, _AUGMENT_TAG]))

    def describe(self) -> str:
        if self.class_balanced:
            counts = np.bincount(self.labels)
            counts = counts[counts > 0]
            return (f"class-balanced: {len(self.labels)} draws per epoch with replacement, p ∝ 1/n_c "
                    f"(n_c {counts.min()}..{counts.max()}): every class {len(self.labels) / len(counts):.1f} "
                    "images per epoch in expectation")
        return f"uniform: each of the {len(self.labels)} train images once per epoch, seeded order"


class PerClassSampler(StepSampler):
    """Every step trains one class: its global batch (batch_size x world) holds only that class's
    images. A round of C steps gives every class one step, in a seeded order per round; a class's
    images come in seeded permutations of its own, one after another (a class with fewer images than
    a batch repeats them, as DA-Fusion's repeated dataset does). Over R rounds each class gets R steps
    on R x batch_size x world images: the separate per-class runs of DA-Fusion, interleaved."""

    def __init__(self, labels, num_classes: int, seed: int, batch_size: int, world: int = 1):
        super().__init__(labels, num_classes, False, seed, batch_size, world)
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(num_classes)]
        self.classes = np.array([c for c in range(num_classes) if len(self.by_class[c])], dtype=np.int64)
        self.steps_per_epoch = len(self.classes)  # one round
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def class_of(self, step: int) -> int:
        epoch, slot = self.position(step)
        return int(self.epoch_order(epoch)[slot])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The classes of a round's steps, in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _CLASS_ORDER_TAG]))
        self._cached = (epoch, rng.permutation(self.classes))
        return self._cached[1]

    def _class_stream(self, c: int, positions: np.ndarray) -> np.ndarray:
        images = self.by_class[c]
        out = np.empty(len(positions), dtype=np.int64)
        for i, pos in enumerate(positions):
            k, j = divmod(int(pos), len(images))
            if self._perms.get(c, (None,))[0] != k:  # one permutation per class kept: positions only grow
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, c, k, _CLASS_IMAGES_TAG]))
                self._perms[c] = (k, rng.permutation(images))
            out[i] = self._perms[c][1][j]
        return out

    def indices(self, step: int, rank: int) -> np.ndarray:
        epoch, _ = self.position(step)
        c = self.class_of(step)
        start = epoch * self.batch_size * self.world + rank * self.batch_size  # class c's step `epoch`
        return self._class_stream(c, np.arange(start, start + self.batch_size))

    def describe(self) -> str:
        return (f"per-class: every step one class, its global batch of {self.batch_size} x {self.world} all that "
                f"class's images; a round of {len(self.classes)} steps trains each class once (DA-Fusion's separate "
                "per-class runs, interleaved)")


def sampler_for(labels, num_classes: int, token_schedule: str, class_balanced: bool, seed: int, batch_size: int,
                world: int = 1) -> StepSampler:
    """The sampler a run's options ask for (the workers, the driver's description and tests alike)."""
    if token_schedule == "per-class":
        return PerClassSampler(labels, num_classes, seed, batch_size, world)
    return StepSampler(labels, num_classes, class_balanced, seed, batch_size, world)
