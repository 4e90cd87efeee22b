"""The CPU stages around translation, so the translation actor does nothing but GPU work:

  before   `prepare_sources`: read each pair's source bytes (only the Parquet row groups that
           hold them), decode, resize to the model's square resolution -> uint8 pixels;
  after    `finish_images`: resize each output back to its source's size, encode the JPEG,
           record failed pairs, and cast to the shard schema.

Ray Data runs them in their own workers, overlapped with the translation actors.

This module must not import torch or diffusers (nor translate.py): Ray workers import it to run
these stages, and on a small machine ~8 s of imports per worker would steal the CPU the
translation actors are using."""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from ..canonical import read_located
from ..contracts import COL_IMAGE, COL_PAIR_ID, COL_PROMPT, PLAN_SCHEMA, SHARD_SCHEMA
from ..exactly_once import write_failures
from ..images import BadImage, decode_rgb

# Internal columns between the stages (never written to shards).
COL_FILE = "_file"  # index into the train split's file list
COL_ROW = "_row"  # row index inside that file
COL_PIXELS = "_pixels"  # uint8 (R, R, 3): the resized source before translation, the output after
COL_SOURCE_W = "_source_w"  # the source's size, to resize the output back (0: keep the model's size)
COL_SOURCE_H = "_source_h"
COL_ERROR = "_error"  # "" for a good pair, else why it failed

PLAN_COLUMNS = PLAN_SCHEMA.names


def source_pixels(data: bytes, resolution: int) -> tuple[np.ndarray, int, int]:
    """(uint8 (R, R, 3) pixels, width, height) of an encoded source image. As the reference:
    bilinear resize to the model's square resolution (aspect not kept); `finish_images` resizes
    the output back to (width, height)."""
    img = decode_rgb(data)
    resized = img.resize((resolution, resolution), Image.BILINEAR) if img.size != (resolution,) * 2 else img
    return np.asarray(resized, dtype=np.uint8), img.width, img.height


def plan_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The plan's columns of `table` as numpy arrays, the actor's batch format."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in PLAN_COLUMNS}


def decode_sources(plan: dict[str, np.ndarray], data: list[bytes | None], resolution: int) -> dict:
    """Plan columns + their sources' bytes -> the translation actor's input: uint8 pixels at the
    model's resolution, the sources' sizes, and `_error` for a source that fails to decode (its
    row stays, with zero pixels: the failure is counted downstream)."""
    n = len(data)
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = [""] * n
    for i, raw in enumerate(data):
        try:
            pixels[i], widths[i], heights[i] = source_pixels(raw or b"", resolution)
        except BadImage as e:  # counted and reported, the run goes on
            errors[i] = f"source image failed to decode: {e}"
    return plan | {COL_PIXELS: pixels, COL_SOURCE_W: widths, COL_SOURCE_H: heights,
                   COL_ERROR: np.array(errors, dtype=object)}


def prepare_sources(batch: pa.Table, files: list[str], resolution: int, chunk_rows: int) -> Iterator[dict]:
    """The stage before translation: plan rows (with their sources' file/row) -> batches of at
    most `chunk_rows` rows for the actor. A generator, so a whole plan block (~a shard) reads its
    row groups once while the decoded pixels (R*R*3 bytes a row) leave in bounded chunks, which
    Ray Data coalesces into blocks."""
    data = read_located(batch, files, COL_FILE, COL_ROW)
    for start in range(0, batch.num_rows, chunk_rows):
        chunk = batch.slice(start, chunk_rows)
        yield decode_sources(plan_columns(chunk), data[start:start + chunk.num_rows], resolution)


def encode_jpeg(pixels: np.ndarray, size: tuple[int, int], quality: int) -> tuple[bytes, int, int]:
    """JPEG bytes of uint8 (H, W, 3) pixels, resized (bicubic) to `size` unless it is (0, 0)."""
    img = Image.fromarray(pixels)
    if size[0] > 0 and size != img.size:
        img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.width, img.height


def plan_column(values: np.ndarray, rows: list[int], type_: pa.DataType) -> pa.Array:
    """The `rows` of a plan column as it left the actor, back in the plan's Arrow type."""
    picked = values[rows]
    if pa.types.is_string(type_):
        # A column of nulls (text-to-image modes have no source_id) reaches the stage as float NaN.
        picked = [v if isinstance(v, str) else None for v in picked]
    return pa.array(picked, type_)


def finish_images(batch: dict[str, np.ndarray], failed_uri: str | None, jpeg_quality: int) -> pa.Table:
    """The stage after translation: translated rows -> shard rows, good images as JPEG at their
    source's size. Failed pairs are left out and recorded under `failed_uri` (one JSON file per
    batch; None: not recorded)."""
    errors = [str(e) for e in batch[COL_ERROR]]
    bad = [i for i, e in enumerate(errors) if e]
    if bad and failed_uri:
        ids = batch[COL_PAIR_ID]
        write_failures(failed_uri, [{COL_PAIR_ID: str(ids[i]), "error": errors[i]} for i in bad])
    good = [i for i, e in enumerate(errors) if not e]
    encoded = [encode_jpeg(batch[COL_PIXELS][i], (int(batch[COL_SOURCE_W][i]), int(batch[COL_SOURCE_H][i])),
                           jpeg_quality) for i in good]
    columns = {f.name: plan_column(batch[f.name], good, f.type) for f in PLAN_SCHEMA}
    columns.update({COL_IMAGE: pa.array([e[0] for e in encoded], pa.binary()),
                    "width": pa.array([e[1] for e in encoded], pa.int32()),
                    "height": pa.array([e[2] for e in encoded], pa.int32()),
                    COL_PROMPT: pa.array([str(batch[COL_PROMPT][i]) for i in good], pa.string())})
    return pa.table([columns[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)
