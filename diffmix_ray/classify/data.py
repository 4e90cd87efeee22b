"""Classifier input: image bytes live in Ray's object store (one object per shard file, loaded by
tasks on the cluster, shared zero-copy by every worker on a node), and each epoch every rank
streams its slice of a deterministic real/synthetic mix through Ray Data tasks that pick rows,
decode, augment and attach soft labels. Random access by (file, row) is what lets a sample be
replaced by any synthetic image without reading whole shards again."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .. import storage
from ..contracts import COL_IMAGE, COL_LABEL, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL
from ..errors import DiffmixError
from ..images import BadImage, decode_rgb
from . import labels as lab
from .transforms import pipeline

COLS = ("file", "row", "source", "target", "strength")


@dataclass
class Rows:
    """Where a set of samples lives: indices into a list of image-column objects, plus labels."""

    file: np.ndarray
    row: np.ndarray
    source: np.ndarray
    target: np.ndarray
    strength: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(*(getattr(self, c)[idx] for c in COLS))

    def table(self) -> pa.Table:
        return pa.table({"file": pa.array(self.file, pa.int32()), "row": pa.array(self.row, pa.int64()),
                         "source": pa.array(self.source, pa.int32()), "target": pa.array(self.target, pa.int32()),
                         "strength": pa.array(self.strength, pa.float32())})


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
               rank: int, world: int, own: tuple[np.ndarray, np.ndarray] | None = None) -> Rows:
    """This rank's samples for one epoch. Every rank gets the same count (a DDP step count that
    differs between ranks would hang the all-reduce), so up to world-1 samples are left out. `own`:
    replace a real image only by its own translations (labels.own_index)."""
    order, replace = lab.epoch_mix(len(real), len(synthetic), p, syn_weights, seed, epoch, own)
    mixed = real.take(order)
    hit = replace >= 0
    if hit.any():
        chosen = synthetic.take(replace[hit])
        for c in COLS:
            getattr(mixed, c)[hit] = getattr(chosen, c)
    per_rank = len(mixed) // world
    return mixed.take(np.arange(rank, per_rank * world, world))


def decode(data: bytes, where: str):
    """Decode one stored image; a bad one is named by where it lives (shard file and row)."""
    try:
        return decode_rgb(data)
    except BadImage as e:
        raise DiffmixError(f"cannot decode the image at {where}: {e}. The file was changed or damaged after it was "
                           "written: re-run the stage that wrote it (prepare or generate)") from None


def images_of(columns: dict, files: np.ndarray, rows: np.ndarray, uris: list[str], tf) -> np.ndarray:
    """Decode and transform the images at (file, row); `columns` maps a file index to its image column."""
    out = []
    for f, r in zip(files, rows):
        img = decode(columns[int(f)][int(r)].as_py(), f"row {int(r)} of {uris[int(f)]}")
        out.append(tf(img).numpy())
    return np.stack(out).astype(np.float32)


def load_batch(batch: pa.Table, refs: list, uris: list[str], num_classes: int, gamma: float, smoothing: float,
               training: bool, data_cfg: dict) -> dict[str, np.ndarray]:
    """Ray Data UDF: fetch the rows' bytes from the object store, decode, augment, label."""
    import ray

    files = batch.column("file").to_numpy()
    rows = batch.column("row").to_numpy()
    columns = {int(f): ray.get(refs[int(f)]).column(COL_IMAGE) for f in np.unique(files)}
    images = images_of(columns, files, rows, uris, pipeline(data_cfg, training))
    source = batch.column("source").to_numpy()
    target = batch.column("target").to_numpy()
    y = lab.soft_labels(source, target, batch.column("strength").to_numpy(), gamma, num_classes)
    return {"image": images, "target": lab.smooth(y, smoothing).astype(np.float32), "label": target.astype(np.int64)}


def epoch_dataset(rows: Rows, refs: list, uris: list[str], num_classes: int, gamma: float, smoothing: float,
                  training: bool, data_cfg: dict, block_rows: int):
    """A Ray Dataset over `rows` that yields decoded, augmented, labelled batches."""
    import ray

    table = rows.table()
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)] or [table]
    return ray.data.from_arrow(blocks).map_batches(
        load_batch, batch_format="pyarrow", batch_size=block_rows, num_cpus=0.5,
        fn_kwargs=dict(refs=refs, uris=uris, num_classes=num_classes, gamma=gamma, smoothing=smoothing, training=training,
                       data_cfg=data_cfg))
