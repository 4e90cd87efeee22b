"""Training images for `finetune`: the train split only, read once by each worker, then per step
the rows the step sampler picks (sampling.py: a function of seed, step and rank, so runs are
deterministic and a resume continues exactly), decoded, resized, randomly cropped and flipped
to the model resolution (the reference's Resize -> RandomCrop -> RandomHorizontalFlip). Pixels
leave as uint8; the training step scales them to [-1, 1] on its device.

A background thread prepares the next steps' batches while the current one trains: a step
decodes batch_size images (2 by default), milliseconds of CPU beside a diffusion step, so the
decoding runs in the worker rather than in a separate pipeline. Holding the encoded split in
memory is what random access by the sampler needs; fine-grained train splits are a few hundred MB
at most (CUB-200's is ~0.3 GB)."""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from .. import canonical
from ..contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL, COL_SPLIT
from ..errors import DiffmixError
from ..images import decode_rgb
from .sampling import StepSampler, sampler_for

COL_PIXELS = "pixels"  # uint8 (N, 3, R, R)
COL_KEY = "key"  # int64 digest of image_id: lets a worker record which images it saw
READ_COLUMNS = [COL_IMAGE_ID, COL_IMAGE, COL_LABEL, COL_SPLIT]
PREFETCH_STEPS = 2  # batches prepared ahead of the one training


def epoch_rows(class_counts: list[int]) -> int:
    """Images one epoch draws over all workers (the sampler's N, balanced or not)."""
    return sum(class_counts)


def check_train_only(splits) -> None:
    """The leakage guard: finetune must never see a val or test image."""
    bad = sorted({str(s) for s in splits} - {"train"})
    if bad:
        raise DiffmixError(f"leakage guard: rows of split(s) {bad} reached finetune, which may read only the "
                           "train split; the dataset's train shards hold other splits: re-run `diffmix-ray prepare`")


def image_key(image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little", signed=True)


def resize_crop_flip(img: Image.Image, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Shorter side -> resolution (bilinear), random square crop, horizontal flip with p=0.5; CHW uint8."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.BILINEAR)
    left = int(rng.integers(0, size[0] - resolution + 1))
    top = int(rng.integers(0, size[1] - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_batch(batch: dict[str, np.ndarray], resolution: int,
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Columns of encoded rows (numpy) -> augmented uint8 pixels, labels and image keys. `rng` draws
    the crops and flips (the step sampler seeds it per step and rank)."""
    check_train_only(batch[COL_SPLIT])
    rng = rng if rng is not None else np.random.default_rng()
    n = len(batch[COL_IMAGE])
    pixels = np.empty((n, 3, resolution, resolution), dtype=np.uint8)
    for i, data in enumerate(batch[COL_IMAGE]):
        try:
            img = decode_rgb(data)
        except ValueError as e:
            raise DiffmixError(f"train image {batch[COL_IMAGE_ID][i]!r} cannot be decoded ({e}); "
                               "re-run `diffmix-ray prepare` on the source") from e
        pixels[i] = resize_crop_flip(img, resolution, rng)
    return {COL_PIXELS: pixels, COL_LABEL: np.asarray(batch[COL_LABEL], dtype=np.int64),
            COL_KEY: np.array([image_key(str(i)) for i in batch[COL_IMAGE_ID]], dtype=np.int64)}


def read_train(dataset: canonical.Dataset) -> pa.Table:
    """The encoded train split, leakage-guarded: only the train shards are opened, and every row's
    split is checked."""
    if not dataset.files("train"):
        raise DiffmixError(f"{dataset.uri} has no train shards; finetune reads only the train split")
    table = dataset.read_split("train", columns=READ_COLUMNS)
    check_train_only(table.column(COL_SPLIT).unique().to_pylist())
    return table


def step_batch(table: pa.Table, sampler: StepSampler, resolution: int, step: int, rank: int) -> dict:
    """Rank `rank`'s batch of `step` as torch tensors: the same pixels whenever it is asked for."""
    import torch

    rows = table.take(pa.array(sampler.indices(step, rank))).to_pydict()
    out = decode_batch({k: np.array(v, dtype=object) for k, v in rows.items()}, resolution,
                       sampler.augment_rng(step, rank))
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _steps(load: Callable[[int], dict], first: int, last: int, prefetch: int) -> Iterator[dict]:
    if prefetch < 1:
        yield from (load(s) for s in range(first, last + 1))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="finetune-data") as pool:
        pending = deque(pool.submit(load, s) for s in range(first, min(last, first + prefetch - 1) + 1))
        following = first + len(pending)
        while pending:
            batch = pending.popleft().result()
            if following <= last:
                pending.append(pool.submit(load, following))
                following += 1
            yield batch


def step_epochs(table: pa.Table, sampler: StepSampler, resolution: int, rank: int, first_step: int = 1,
                prefetch: int = PREFETCH_STEPS) -> Iterator[Iterator[dict]]:
    """Endless epochs, each an iterator of this rank's batches for the steps left in it, starting at
    `first_step` (a resume starts mid-epoch, at the step after its checkpoint)."""
    if sampler.steps_per_epoch < 1:
        raise DiffmixError(f"{table.num_rows} train images fill no global batch of {sampler.batch_size} x "
                           f"{sampler.world} worker(s); lower --batch-size or --workers")
    step = first_step
    while True:
        epoch, _ = sampler.position(step)
        last = (epoch + 1) * sampler.steps_per_epoch
        yield _steps(lambda s: step_batch(table, sampler, resolution, s, rank), step, last, prefetch)
        step = last + 1


def local_batches(dataset: canonical.Dataset, resolution: int, batch_size: int, class_balanced: bool,
                  seed: int, per_class: bool = False) -> Iterator[Iterator[dict]]:
    """The same batches for in-process training on one rank (tests, benchmarks, debugging)."""
    table = read_train(dataset)
    sampler = sampler_for(table.column(COL_LABEL).to_numpy(), dataset.info.num_classes,
                          "per-class" if per_class else "joint", class_balanced, seed, batch_size)
    return step_epochs(table, sampler, resolution, rank=0, prefetch=0)
