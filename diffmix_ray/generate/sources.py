"""The light stages around translation: attach source image bytes to plan rows before it, keep
the good rows (and record the failed ones) after it.

Sources are fetched without loading the dataset into every worker: each row carries the (file,
row) location of its source in the train split, and a batch reads only the Parquet row groups
that hold its rows.

This module must not import torch or diffusers (nor translate.py): Ray workers import it to run
these stages, and on a small machine ~8 s of imports per worker would steal the CPU the
translation actors are using."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pyarrow as pa

from .. import storage
from ..canonical import read_rows
from ..contracts import COL_PAIR_ID, SHARD_SCHEMA

COL_FILE = "_file"  # index into the train split's file list
COL_ROW = "_row"  # row index inside that file
COL_SOURCE_IMAGE = "_source_image"  # source bytes attached before translation
COL_ERROR = "_error"  # set by translation: "" for a good image, else why the pair failed


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


def keep_good_rows(batch: pa.Table, failed_uri: str) -> pa.Table:
    """Record failed pairs under <out>/failed/ and pass on only good rows, in the shard schema."""
    errors = batch.column(COL_ERROR).to_pylist()
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        ids = batch.column(COL_PAIR_ID).to_pylist()
        storage.write_json_atomic(storage.join(failed_uri, f"{uuid.uuid4().hex}.json"),
                                  [{"pair_id": ids[i], "error": errors[i]} for i in bad])
    good = batch.filter(pa.array([not e for e in errors]))
    return pa.table([good.column(f.name).cast(f.type) for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)
