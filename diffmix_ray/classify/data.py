"""Classifier input: image bytes live in Ray's object store (one object per shard file, loaded by
tasks on the cluster, shared zero-copy by every worker on a node), and each epoch every rank
streams its slice of a deterministic real/synthetic mix through Ray Data tasks that pick rows,
decode and augment into uint8 pixels (or, with --gpu-decode, only ship the encoded bytes); the
training device normalises and makes the soft labels. One dataset streams all of a run's epochs.
Random access by (file, row) is what lets a sample be replaced by any synthetic image without
reading whole shards again. Each training sample carries its own augmentation seed, drawn from
(seed, epoch, position): the random crops, flips and jitter a sample gets do not depend on which
worker process decodes it, so a run restored from a checkpoint sees the pixels an uninterrupted run
of the same config sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from .. import storage
from ..contracts import COL_IMAGE, COL_LABEL, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL
from ..errors import DiffmixError
from ..images import BadImage, decode_rgb
from . import labels as lab
from .transforms import pipeline

COLS = ("file", "row", "source", "target", "strength", "draw")


@dataclass
class Rows:
    """Where a set of samples lives: indices into a list of image-column objects, plus labels, and
    per sample the seed of its random augmentation (`draw`; 0 until an epoch's order assigns one)."""

    file: np.ndarray
    row: np.ndarray
    source: np.ndarray
    target: np.ndarray
    strength: np.ndarray
    draw: np.ndarray | None = None

    def __post_init__(self):
        if self.draw is None:
            self.draw = np.zeros(len(self.file), dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.file)

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(*(getattr(self, c)[idx] for c in COLS))

    def table(self) -> pa.Table:
        return pa.table({"file": pa.array(self.file, pa.int32()), "row": pa.array(self.row, pa.int64()),
                         "source": pa.array(self.source, pa.int32()), "target": pa.array(self.target, pa.int32()),
                         "strength": pa.array(self.strength, pa.float32()), "draw": pa.array(self.draw, pa.uint32())})


def load_image_column(uri: str) -> pa.Table:
    """Runs as a Ray task: the image column of one shard, kept in the object store."""
    return storage.read_parquet(uri, [COL_IMAGE])


def rows_of(tables: list[pa.Table], file_offset: int, synthetic: bool) -> Rows:
    """Rows of the given metadata tables (one per file, in file order)."""
    parts = []
    for f, t in enumerate(tables):
        n = t.num_rows
        if synthetic:
            src = t.column(COL_SOURCE_LABEL).to_numpy()
            tgt = t.column(COL_TARGET_LABEL).to_numpy()
            s = t.column(COL_STRENGTH).to_numpy().astype(np.float32)
        else:
            src = tgt = t.column(COL_LABEL).to_numpy()
            s = np.zeros(n, dtype=np.float32)
        parts.append((np.full(n, f + file_offset), np.arange(n), src, tgt, s))
    if not parts:
        return Rows(*(np.zeros(0, dtype=d) for d in (np.int32, np.int64, np.int32, np.int32, np.float32)))
    return Rows(*(np.concatenate([p[i] for p in parts]) for i in range(5)))


def epoch_rows(real: Rows, synthetic: Rows, p: float, syn_weights: np.ndarray | None, seed: int, epoch: int,
               rank: int, world: int, own: tuple[np.ndarray, np.ndarray] | None = None,
               real_weights: np.ndarray | None = None) -> Rows:
    """This rank's samples for one epoch. Every rank gets the same count (a DDP step count that
    differs between ranks would hang the all-reduce), so up to world-1 samples are left out. `own`:
    replace a real image only by its own translations (labels.own_index). `real_weights`: draw the
    real rows by these weights (CMO's minority stream) instead of shuffling them. Each position gets
    its augmentation seed from (seed, epoch, position, stream), whatever the number of ranks."""
    order, replace = lab.epoch_mix(len(real), len(synthetic), p, syn_weights, seed, epoch, own, real_weights)
    mixed = real.take(order)
    hit = replace >= 0
    if hit.any():
        chosen = synthetic.take(replace[hit])
        for c in COLS:
            getattr(mixed, c)[hit] = getattr(chosen, c)
    stream = 0xA06 if real_weights is None else 0xA07
    mixed.draw = np.random.SeedSequence([seed, epoch, stream]).generate_state(len(mixed), dtype=np.uint32)
    per_rank = len(mixed) // world
    return mixed.take(np.arange(rank, per_rank * world, world))


def run_rows(real: Rows, synthetic: Rows, p: float, syn_weights: np.ndarray | None, seed: int, epochs: range,
             rank: int, world: int, batch_size: int, own: tuple[np.ndarray, np.ndarray] | None = None,
             drop_last: bool = True, real_weights: np.ndarray | None = None) -> tuple[Rows, int]:
    """This rank's samples for every epoch in `epochs`, one after another, and the steps of one epoch.
    Each epoch is cut to whole batches (the rows an incomplete last batch would hold are left out, as
    drop_last did), so that one dataset streams the whole run and batch k is the same whatever
    surrounds it: no pipeline drains and refills at every epoch boundary. Without `drop_last` every
    row stays, the last step of an epoch is smaller, and `regroup` cuts the stream at epoch ends."""
    parts = [epoch_rows(real, synthetic, p, syn_weights, seed, e, rank, world, own, real_weights) for e in epochs]
    per_epoch = len(parts[0]) if parts else 0
    steps = per_epoch // batch_size if drop_last else -(-per_epoch // batch_size)
    if drop_last:
        keep = np.arange(steps * batch_size)
        parts = [r.take(keep) for r in parts]
    if not parts:
        return real.take(np.arange(0)), steps
    return Rows(*(np.concatenate([getattr(r, c) for r in parts]) for c in COLS)), steps


def epoch_sizes(rows_per_epoch: int, batch_size: int, epochs: int) -> Iterator[int]:
    """The batch sizes of `epochs` epochs of `rows_per_epoch` rows, the last batch of each smaller."""
    for _ in range(epochs):
        full, last = divmod(rows_per_epoch, batch_size)
        yield from [batch_size] * full + ([last] if last else [])


def _size(batch: dict) -> int:
    return len(batch["label"])


def _join(parts: list[dict]) -> dict:
    import torch

    if len(parts) == 1:
        return parts[0]
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        out[key] = (torch.cat(values) if isinstance(first, torch.Tensor) else np.concatenate(values)
                    if isinstance(first, np.ndarray) else [v for part in values for v in part])
    return out


def regroup(batches: Iterator[dict], sizes: Iterator[int]) -> Iterator[dict]:
    """Batches of the given sizes cut from a stream of fixed-size ones (tensors, arrays or lists per
    key): the stream of a whole run, batched across epoch ends, back into each epoch's steps."""
    source = iter(batches)
    current, pos = None, 0
    for size in sizes:
        parts, need = [], size
        while need > 0:
            if current is None or pos == _size(current):
                current, pos = next(source, None), 0
                if current is None:
                    raise RuntimeError(f"the data ran out {need} rows before a batch of {size}")
            take = min(need, _size(current) - pos)
            parts.append({k: v[pos:pos + take] for k, v in current.items()})
            pos, need = pos + take, need - take
        yield _join(parts)


def decode(data: bytes, where: str):
    """Decode one stored image; a bad one is named by where it lives (shard file and row)."""
    try:
        return decode_rgb(data)
    except BadImage as e:
        raise DiffmixError(f"cannot decode the image at {where}: {e}. The file was changed or damaged after it was "
                           "written: re-run the stage that wrote it (prepare or generate)") from None


def where(uris: list[str], file: int, row: int) -> str:
    return f"row {int(row)} of {uris[int(file)]}"


def seed_augmentation(draw: int) -> None:
    """Seed every generator an augmentation step may read (torchvision's: torch; timm's crops and
    auto-augment: random and numpy) before one sample's pipeline runs."""
    import random

    import torch

    random.seed(draw)
    np.random.seed(draw)
    # The CPU generator only: torch.manual_seed seeds every device's too (0.1 ms a sample, 7 us this way).
    torch.default_generator.manual_seed(draw)


def images_of(columns: dict, files: np.ndarray, rows: np.ndarray, uris: list[str], tf,
              draws: np.ndarray | None = None) -> np.ndarray:
    """Decode and augment the images at (file, row) into one uint8 NHWC array (`tf` ends with
    transforms.ToPixels); `columns` maps a file index to its image column. With `draws`, each
    sample's augmentation is seeded by its own draw."""
    images = []
    for i, (f, r) in enumerate(zip(files, rows)):
        if draws is not None:
            seed_augmentation(int(draws[i]))
        images.append(tf(decode(columns[int(f)][int(r)].as_py(), where(uris, f, r))))
    return np.stack(images)


def load_batch(batch: pa.Table, refs: list, uris: list[str], training: bool, data_cfg: dict,
               encoded: bool = False):
    """Ray Data UDF: fetch the rows' bytes from the object store, then decode and augment them into
    uint8 pixels, or (`encoded`, for --gpu-decode) ship the bytes as they are with their (file, row)
    for error messages. Labels leave as (source, target, strength): the soft target is made on the
    training device (step.soft_targets), so one batch serves any gamma and smoothing."""
    import ray

    files = batch.column("file").to_numpy()
    rows = batch.column("row").to_numpy()
    columns = {int(f): ray.get(refs[int(f)]).column(COL_IMAGE) for f in np.unique(files)}
    labels = {"source": batch.column("source").to_numpy().astype(np.int64),
              "label": batch.column("target").to_numpy().astype(np.int64),
              "strength": batch.column("strength").to_numpy().astype(np.float32)}
    if encoded:
        image = pa.array([columns[int(f)][int(r)].as_py() for f, r in zip(files, rows)], pa.binary())
        return pa.table({"image": image, "file": batch.column("file"), "row": batch.column("row"),
                         **{k: pa.array(v) for k, v in labels.items()}})
    draws = batch.column("draw").to_numpy() if training else None  # evaluation pipelines draw nothing
    return {"image": images_of(columns, files, rows, uris, pipeline(data_cfg, training), draws), **labels}


# A decoding task keeps one CPU busy, so it asks for one: at half a CPU Ray ran two per core, which only
# time-sliced them and started twice the processes, each importing torch, torchvision and timm (~4.5
# core-s and ~800 MB). Measured on a 3-node test cluster: a 5-epoch train-cls 91 -> 60 core-s, 49 -> 35 s.
# Shipping encoded bytes (--gpu-decode) imports none of them and mostly waits: half a CPU.
DECODE_CPUS = 1.0


def dataset(rows: Rows, refs: list, uris: list[str], training: bool, data_cfg: dict, block_rows: int,
            encoded: bool = False):
    """A Ray Dataset over `rows`, in their order, that yields augmented (or encoded) labelled rows."""
    import ray

    table = rows.table()
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)] or [table]
    ds = ray.data.from_blocks(blocks).map_batches(  # metadata read here, not by a task per block (pool_stage)
        load_batch, batch_format="pyarrow", batch_size=block_rows, num_cpus=0.5 if encoded else DECODE_CPUS,
        fn_kwargs=dict(refs=refs, uris=uris, training=training, data_cfg=data_cfg, encoded=encoded))
    # In order: the steps of an epoch are the batches of its rows (run_rows), never a neighbour's.
    ds.context.execution_options.preserve_order = True
    return ds


def batches(ds, batch_size: int, device, encoded: bool = False, drop_last: bool = False) -> Iterator[dict]:
    """The dataset's batches as step.py takes them: tensors on `device` (pinned and copied by Ray
    Data's prefetch thread on a GPU), or with `encoded` the images as a list of bytes on the host."""
    import torch

    if not encoded:
        yield from ds.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, device=device,
                                         prefetch_batches=2, pin_memory=device.type == "cuda")
        return
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2):
        out = {k: torch.as_tensor(b[k]).to(device, non_blocking=True) for k in ("source", "label", "strength")}
        yield out | {"image": list(b["image"]), "file": b["file"], "row": b["row"]}


def training_batches(rows: Rows, minority: Rows | None, epochs: int, cfg, device) -> Iterator[dict] | None:
    """The training steps of the run's remaining `epochs`, in order: one dataset streams all of them;
    without drop_last the stream is cut back at epoch ends (regroup). With CMO, the minority stream
    (`minority`: the same count of rows, drawn by 1/n_c) rides along under `cmo_*` keys, cut the same way."""
    if not len(rows):
        return None
    size, encoded = cfg.batch_size, cfg.gpu_decode

    def stream(r: Rows) -> Iterator[dict]:
        out = batches(dataset(r, cfg.refs, cfg.uris, True, cfg.data_cfg, cfg.block_rows, encoded), size, device,
                      encoded)
        return out if cfg.drop_last else regroup(out, epoch_sizes(len(r) // epochs, size, epochs))

    main = stream(rows)
    if minority is None:
        return main
    return (b | {f"cmo_{k}": v for k, v in m.items()} for b, m in zip(main, stream(minority)))
