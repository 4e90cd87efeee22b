"""Attach source image bytes to plan rows without loading the dataset into every worker: each
row carries the (file, row) location of its source in the train split, and a batch reads only
the Parquet row groups that hold its rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..contracts import COL_IMAGE
from .translate import COL_SOURCE_IMAGE

COL_FILE = "_file"  # index into the train split's file list
COL_ROW = "_row"  # row index inside that file


def read_rows(uri: str, rows: list[int]) -> dict[int, bytes]:
    """Image bytes of the given rows of one canonical shard, reading only their row groups."""
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


def attach_sources(batch: pa.Table, files: list[str]) -> pa.Table:
    file_idx = batch.column(COL_FILE).to_pylist()
    row_idx = batch.column(COL_ROW).to_pylist()
    by_file: dict[int, list[int]] = defaultdict(list)
    for f, r in zip(file_idx, row_idx):
        by_file[f].append(r)
    fetched = {f: read_rows(files[f], rows) for f, rows in by_file.items()}
    images = [fetched[f][r] for f, r in zip(file_idx, row_idx)]
    batch = batch.drop_columns([COL_FILE, COL_ROW])
    return batch.append_column(COL_SOURCE_IMAGE, pa.array(images, pa.binary()))
