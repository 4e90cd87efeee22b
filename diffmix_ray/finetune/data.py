"""Training images for `finetune`: the train split only, as encoded bytes until the last stage,
then decoded, resized, randomly cropped and flipped to the model resolution (the reference's
Resize -> RandomCrop -> RandomHorizontalFlip). Pixels leave as uint8 (4x smaller than float in
the object store); the training step scales them to [-1, 1] on its device.

Class balancing (long-tail data) is a per-row repeat: each train image of class c appears
round(n_max / n_c) times per epoch, so every class contributes about n_max images per epoch and
a row's weight is proportional to 1 / n_c, like the reference's WeightedRandomSampler, but
deterministic. The rows are then globally reshuffled every epoch (Ray Data re-runs the pipeline
per epoch), so the repeats of one image spread over the epoch.

The encoded train split is read once and held in the object store when it is small enough
(MATERIALIZE_MAX_BYTES; fine-grained datasets are), so an epoch costs a shuffle and a decode,
not a new listing and read of the files."""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from .. import canonical, storage
from ..contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL, COL_SPLIT
from ..errors import DiffmixError
from ..images import decode_rgb

COL_PIXELS = "pixels"  # uint8 (N, 3, R, R)
COL_KEY = "key"  # int64 digest of image_id: lets a worker record which images it saw
READ_COLUMNS = [COL_IMAGE_ID, COL_IMAGE, COL_LABEL, COL_SPLIT]
DECODE_BATCH_ROWS = 32
# Train splits up to this size (encoded) are read once and kept in the object store for all epochs
# (CUB-200's train split is ~0.3 GB); larger ones are streamed from storage every epoch.
MATERIALIZE_MAX_BYTES = 2 * 2**30


def balanced_repeats(class_counts: list[int]) -> list[int]:
    """Times each row of class c is repeated per epoch: round(n_max / n_c), at least 1."""
    n_max = max(class_counts)
    return [max(1, round(n_max / n)) if n else 0 for n in class_counts]


def epoch_rows(class_counts: list[int], class_balanced: bool) -> int:
    """Rows one epoch yields over all workers."""
    if not class_balanced:
        return sum(class_counts)
    return sum(n * r for n, r in zip(class_counts, balanced_repeats(class_counts)))


def repeat_rows(batch: pa.Table, repeats: list[int]) -> pa.Table:
    """Each row repeated repeats[label] times (the class-balanced epoch)."""
    labels = batch.column(COL_LABEL).to_numpy()
    counts = np.asarray(repeats, dtype=np.int64)[labels]
    return batch.take(pa.array(np.repeat(np.arange(batch.num_rows), counts)))


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
    """Ray Data map_batches UDF (numpy format): JPEG bytes -> augmented uint8 pixels. Without `rng`
    the crops are drawn fresh on every call, so each epoch sees new augmentations."""
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


def _total_bytes(uris: list[str]) -> int:
    total = 0
    for uri in uris:
        fs, path = storage.filesystem(uri)
        with storage.explained(uri):
            total += fs.size(path)
    return total


def train_dataset(dataset: canonical.Dataset, resolution: int, class_balanced: bool,
                  decode_cpus: float = 1.0):
    """The Ray Dataset a TorchTrainer splits over its workers: only the train shards are opened."""
    import ray

    files = dataset.files("train")
    if not files:
        raise DiffmixError(f"{dataset.uri} has no train shards; finetune reads only the train split")
    fs, _ = storage.arrow_filesystem(files[0])
    paths = [storage.arrow_filesystem(uri)[1] for uri in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=READ_COLUMNS)
    if _total_bytes(files) <= MATERIALIZE_MAX_BYTES:
        # Ray Data re-runs the pipeline every epoch; listing and re-reading the files costs seconds each
        # time (measured: ~2.5 s per epoch of a 24-image split), reading them once costs memory instead.
        ds = ds.materialize()
    if class_balanced:
        ds = ds.map_batches(repeat_rows, fn_kwargs={"repeats": balanced_repeats(dataset.info.class_counts("train"))},
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    ds = ds.random_shuffle()  # on the encoded bytes: cheap, and a new order every epoch
    return ds.map_batches(decode_batch, fn_kwargs={"resolution": resolution}, batch_format="numpy",
                          batch_size=DECODE_BATCH_ROWS, num_cpus=decode_cpus)


def local_batches(dataset: canonical.Dataset, resolution: int, batch_size: int, class_balanced: bool,
                  seed: int) -> Iterator[Iterator[dict]]:
    """The same preprocessing without Ray, for in-process training (tests, debugging): an endless
    sequence of epochs, each an iterator of full batches of torch tensors, seeded."""
    import torch

    table = dataset.read_split("train", columns=READ_COLUMNS)
    check_train_only(table.column(COL_SPLIT).unique().to_pylist())
    if class_balanced:
        table = repeat_rows(table, balanced_repeats(dataset.info.class_counts("train")))
    rng = np.random.default_rng(seed)

    def one_epoch(order: np.ndarray) -> Iterator[dict]:
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = table.take(pa.array(order[start:start + batch_size])).to_pydict()
            out = decode_batch({k: np.array(v, dtype=object) for k, v in rows.items()}, resolution, rng)
            yield {k: torch.from_numpy(v) for k, v in out.items()}

    while True:
        yield one_epoch(rng.permutation(table.num_rows))
