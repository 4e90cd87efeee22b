"""Attach source image bytes to plan rows without loading the dataset into every worker: each
row carries the (file, row) location of its source in the train split, and a batch reads only
the Parquet row groups that hold its rows."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from ..canonical import read_rows
from .translate import COL_SOURCE_IMAGE

COL_FILE = "_file"  # index into the train split's file list
COL_ROW = "_row"  # row index inside that file


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
