"""Reading and writing the canonical dataset (the contract in contracts.py), shared by every stage:
`prepare` writes it; finetune, generate and train-cls read it through these functions only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .contracts import (COL_IMAGE, COL_IMAGE_ID, COL_LABEL, COL_SPLIT, DATASET_JSON, DATASET_SCHEMA,
                        IMAGES_DIR, SPLITS, DatasetInfo, check_columns, dataset_shard_name)
from .errors import DiffmixError

# Shards are cut at ~128 MiB of image bytes: large enough that S3 request overhead is small,
# small enough that one Ray Data read task holds one shard comfortably.
SHARD_BYTES = 128 * 2**20
ROW_GROUP_ROWS = 256


@dataclass
class Dataset:
    """A canonical dataset on storage: its root URI and parsed dataset.json."""

    uri: str
    info: DatasetInfo

    def files(self, split: str) -> list[str]:
        return [storage.join(self.uri, IMAGES_DIR, name) for name in self.info.files.get(split, [])]

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """One split as an Arrow table (image bytes included unless `columns` leaves them out)."""
        if split not in SPLITS:
            raise DiffmixError(f"unknown split {split!r}; expected one of {SPLITS}")
        tables = [storage.read_parquet(uri, columns) for uri in self.files(split)]
        if not tables:
            schema = DATASET_SCHEMA if columns is None else pa.schema([DATASET_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def locate(self, split: str, image_ids: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(file index into files(split), row in that file) of each image id, read from the id
        column only; (-1, -1) for None and for an id the split does not hold (the caller says
        which of the two it allows)."""
        where: dict[str, tuple[int, int]] = {}
        for f, uri in enumerate(self.files(split)):
            for r, image_id in enumerate(storage.read_parquet(uri, [COL_IMAGE_ID]).column(COL_IMAGE_ID).to_pylist()):
                where[image_id] = (f, r)
        found = [where.get(i, (-1, -1)) if i is not None else (-1, -1) for i in image_ids]
        files = np.fromiter((w[0] for w in found), np.int32, len(found))
        rows = np.fromiter((w[1] for w in found), np.int64, len(found))
        return files, rows


def open_dataset(uri: str) -> Dataset:
    """Open a complete canonical dataset; refuse anything without dataset.json (incomplete)."""
    uri = storage.normalize(uri)
    storage.check_bucket(uri)
    meta = storage.join(uri, DATASET_JSON)
    if not storage.exists(meta):
        raise DiffmixError(f"{uri} is not a canonical dataset (no {DATASET_JSON}; an interrupted "
                           "`prepare` leaves none): run `diffmix-ray prepare --out` there first")
    info = DatasetInfo.from_json(storage.read_text(meta), where=meta)
    return Dataset(uri, info)


def row_digest(image_id: str, image: bytes, label: int, split: str) -> bytes:
    return hashlib.sha256(b"\0".join([image_id.encode(), hashlib.sha256(image).digest(),
                                      str(label).encode(), split.encode()])).digest()


def fingerprint(classes: list[str], digests: list[bytes]) -> str:
    """Content fingerprint: class list + every row digest, order-independent."""
    h = hashlib.sha256(json.dumps(classes, ensure_ascii=False).encode())
    for d in sorted(digests):
        h.update(d)
    return h.hexdigest()


def write_split_shards(root: str, split: str, table: pa.Table) -> list[str]:
    """Write `table` (one split, already in final row order) as bounded shards; return file names."""
    check_columns(table.schema, DATASET_SCHEMA, f"rows of split {split!r}")
    if table.num_rows == 0:
        return []
    names: list[str] = []
    sizes = pc.binary_length(table.column(COL_IMAGE)).to_pylist()
    start, acc = 0, 0
    for i, size in enumerate(sizes + [None]):
        if size is None or (acc + size > SHARD_BYTES and i > start):
            name = dataset_shard_name(split, len(names))
            uri = storage.join(root, IMAGES_DIR, name)
            fs, path = storage.arrow_filesystem(uri)
            with storage.explained(uri):
                if not storage.is_s3(uri):
                    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                pq.write_table(table.slice(start, i - start).select(DATASET_SCHEMA.names), path,
                               filesystem=fs, row_group_size=ROW_GROUP_ROWS,
                               compression={COL_IMAGE: "NONE", COL_IMAGE_ID: "zstd",
                                            COL_LABEL: "zstd", COL_SPLIT: "zstd"})
            names.append(name)
            start, acc = i, 0
        if size is not None:
            acc += size
    return names


def rows_table(image_ids: list[str], images: list[bytes], labels: list[int], split: str) -> pa.Table:
    return pa.table({COL_IMAGE_ID: pa.array(image_ids, pa.string()),
                     COL_IMAGE: pa.array(images, pa.binary()),
                     COL_LABEL: pa.array(labels, pa.int32()),
                     COL_SPLIT: pa.array([split] * len(image_ids), pa.string())},
                    schema=DATASET_SCHEMA)


def read_located(batch: pa.Table, files: list[str], file_col: str, row_col: str) -> list[bytes | None]:
    """The image bytes at each row's (file index, row) of `files` (None where the file index is -1),
    reading per file only the row groups that hold them."""
    file_idx = batch.column(file_col).to_pylist()
    row_idx = batch.column(row_col).to_pylist()
    by_file: dict[int, list[int]] = {}
    for f, r in zip(file_idx, row_idx):
        if f >= 0:
            by_file.setdefault(f, []).append(r)
    fetched = {f: read_rows(files[f], rows) for f, rows in by_file.items()}
    return [fetched[f].get(r) if f >= 0 else None for f, r in zip(file_idx, row_idx)]


def read_rows(uri: str, rows: list[int]) -> dict[int, bytes]:
    """Image bytes at the given rows of one Parquet file (a canonical or synthetic shard), reading
    only the row groups that hold them: workers fetch what they need instead of whole shards."""
    fs, path = storage.arrow_filesystem(uri)
    with storage.explained(uri):
        pf = pq.ParquetFile(fs.open_input_file(path))
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        wanted = sorted(set(rows))
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in wanted})
        out: dict[int, bytes] = {}
        for g in groups:
            column = pf.read_row_group(g, columns=[COL_IMAGE]).column(COL_IMAGE)
            for r in wanted:
                if starts[g] <= r < starts[g + 1]:
                    out[r] = column[r - int(starts[g])].as_py()
    return out
