"""The CPU stages around scoring, so the scoring actor does nothing but model work:

  before   `prepare_images`: read each pair's synthetic image and its source image (per file,
           only the Parquet row groups that hold them), decode, and resize/crop them as CLIP's
           processor (and the classifier's eval transform) would -> uint8 pixels;
  after    `finish_scores`: record failed pairs, cast the scores to the contract's schema.

Ray Data runs them in their own workers, overlapped with the actors. This module must not import
torch or transformers (nor scorer.py): Ray workers import it to run these stages, and seconds of
imports per worker would steal the CPU the actors use. Preprocessing parameters therefore arrive
as plain dicts (models.clip.ImagePrep as a dict; the classifier's data config)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from ..canonical import read_located
from ..contracts import (COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL, SCORE_COLUMNS,
                         SCORES_SCHEMA)
from ..exactly_once import write_failures
from ..images import BadImage, decode_rgb

# Internal columns between the stages (never written to the scores).
COL_SYN_FILE = "_syn_file"  # index into the synthetic shard list
COL_SYN_ROW = "_syn_row"
COL_SRC_FILE = "_src_file"  # index into the dataset's train files; -1: no source (text-to-image)
COL_SRC_ROW = "_src_row"
COL_CLIP = "_clip"  # uint8 (H, W, 3): the synthetic image as CLIP sees it
COL_CLIP_SRC = "_clip_src"  # the source image as CLIP sees it (zeros without a source)
COL_CLS = "_cls"  # uint8 (S, S, 3): the synthetic image as the classifier sees it (only with one)
COL_ERROR = "_error"  # "" for a good pair, else why it failed
KEY_COLUMNS = (COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_SRC_FILE)  # to the actor
CLASSIFIER_PIPELINES = ("timm", "reference", "reference-lt")  # the eval pipelines classifier_pixels reproduces
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def _short_side_size(img: Image.Image, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side `short` and the aspect kept, rounded down as both
    transformers' and torchvision's resize do."""
    w, h = img.size
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def clip_pixels(img: Image.Image, prep: dict) -> np.ndarray:
    """CLIP's image processor up to the uint8 pixels: resize, centre crop (top-left offset rounded
    down, as transformers crops). Rescaling and normalising happen on the actor's device."""
    if prep["shortest_edge"]:
        size = _short_side_size(img, prep["shortest_edge"])
    elif prep["size"]:
        size = (prep["size"][1], prep["size"][0])
    else:
        size = img.size
    if size != img.size:
        img = img.resize(size, prep["resample"])
    if prep["crop"]:
        ch, cw = prep["crop"]
        top, left = (img.height - ch) // 2, (img.width - cw) // 2
        img = img.crop((left, top, left + cw, top + ch))  # PIL pads with black outside the image
    return np.asarray(img, dtype=np.uint8)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop (offsets rounded to nearest; black padding where the image is smaller)."""
    top, left = int(round((img.height - size) / 2.0)), int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def classifier_pixels(img: Image.Image, data_cfg: dict) -> np.ndarray:
    """The eval pipeline a train-cls run recorded in best/model.json (classify/transforms.py), up to
    the uint8 pixels; normalisation happens on the actor's device.
      timm          the shorter side to floor(img_size / crop_pct), then a centre crop of img_size;
      reference     a (resize x resize) square (bilinear), then the centre crop;
      reference-lt  the shorter side to resize (bilinear), then the centre crop."""
    size = data_cfg["img_size"]
    augment = data_cfg.get("augment", "timm")  # model.json files from before --augment describe timm's
    if augment == "timm":
        img = img.resize(_short_side_size(img, math.floor(size / data_cfg["crop_pct"])),
                         PIL_FILTERS.get(data_cfg["interpolation"], Image.BILINEAR))
    elif augment == "reference":
        img = img.resize((data_cfg["resize"], data_cfg["resize"]), Image.BILINEAR)
    elif augment == "reference-lt":
        img = img.resize(_short_side_size(img, data_cfg["resize"]), Image.BILINEAR)
    else:  # open_classifier refuses such a run before any worker starts
        raise ValueError(f"unknown augment {augment!r} in the classifier's data config")
    return np.asarray(_center_crop(img, size), dtype=np.uint8)


def decode_pairs(keys: dict[str, np.ndarray], synthetic: list[bytes | None], sources: list[bytes | None],
                 has_source: np.ndarray, clip_prep: dict, cls_cfg: dict | None) -> dict[str, np.ndarray]:
    """Key columns + image bytes -> the actor's input. A pair whose synthetic (or source) image
    fails to decode keeps its row with zero pixels and an `_error`: it is counted downstream."""
    n = len(synthetic)
    h, w = prep_hw(clip_prep)
    out = {COL_CLIP: np.zeros((n, h, w, 3), np.uint8), COL_CLIP_SRC: np.zeros((n, h, w, 3), np.uint8)}
    if cls_cfg:
        out[COL_CLS] = np.zeros((n, cls_cfg["img_size"], cls_cfg["img_size"], 3), np.uint8)
    errors = [""] * n
    source_ids = keys[COL_SOURCE_ID]
    decoded_sources: dict[str, np.ndarray | str] = {}  # a source serves several pairs: decode it once
    for i in range(n):
        try:
            img = decode_rgb(synthetic[i] or b"")
            out[COL_CLIP][i] = clip_pixels(img, clip_prep)
            if cls_cfg:
                out[COL_CLS][i] = classifier_pixels(img, cls_cfg)
        except BadImage as e:
            errors[i] = f"synthetic image failed to decode: {e}"
            continue
        if has_source[i]:
            key = str(source_ids[i])
            if key not in decoded_sources:
                try:
                    decoded_sources[key] = clip_pixels(decode_rgb(sources[i] or b""), clip_prep)
                except BadImage as e:
                    decoded_sources[key] = f"source image failed to decode: {e}"
            if isinstance(decoded_sources[key], str):
                errors[i] = decoded_sources[key]
            else:
                out[COL_CLIP_SRC][i] = decoded_sources[key]
    return keys | out | {COL_ERROR: np.array(errors, dtype=object)}


def prep_hw(clip_prep: dict) -> tuple[int, int]:
    return tuple(clip_prep["crop"] or clip_prep["size"])


def prepare_images(batch: pa.Table, syn_files: list[str], src_files: list[str], clip_prep: dict,
                   cls_cfg: dict | None, chunk_rows: int) -> Iterator[dict]:
    """The stage before scoring: todo rows -> batches of at most `chunk_rows` decoded rows. A
    generator, so a whole block (~a shard) reads its row groups once while the pixels leave in
    bounded chunks."""
    synthetic = read_located(batch, syn_files, COL_SYN_FILE, COL_SYN_ROW)
    sources = read_located(batch, src_files, COL_SRC_FILE, COL_SRC_ROW)
    has_source = batch.column(COL_SRC_FILE).to_numpy() >= 0
    for start in range(0, batch.num_rows, chunk_rows):
        chunk = batch.slice(start, chunk_rows)
        keys = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in KEY_COLUMNS}
        # Text-to-image pairs have no source id; "" keeps the column a string column on its way.
        keys[COL_SOURCE_ID] = np.array([s or "" for s in keys[COL_SOURCE_ID]], dtype=object)
        end = start + chunk.num_rows
        yield decode_pairs(keys, synthetic[start:end], sources[start:end], has_source[start:end], clip_prep,
                           cls_cfg)


def finish_scores(batch: dict[str, np.ndarray], failed_uri: str | None) -> pa.Table:
    """The stage after scoring: scored rows -> rows of the scores contract. Failed pairs are left
    out and recorded under `failed_uri` (None: not recorded). NaN in a nullable column (no source
    image, no classifier) becomes null."""
    errors = [str(e) for e in batch[COL_ERROR]]
    if failed_uri:
        ids = batch[COL_PAIR_ID]
        write_failures(failed_uri, [{COL_PAIR_ID: str(ids[i]), "error": e} for i, e in enumerate(errors) if e])
    good = np.array([not e for e in errors], dtype=bool)
    columns = {COL_PAIR_ID: pa.array([str(v) for v in batch[COL_PAIR_ID][good]], pa.string()),
               COL_SOURCE_LABEL: pa.array(batch[COL_SOURCE_LABEL][good], pa.int32()),
               COL_TARGET_LABEL: pa.array(batch[COL_TARGET_LABEL][good], pa.int32())}
    for name in SCORE_COLUMNS:
        values = np.asarray(batch[name][good], dtype=np.float32)
        nullable = SCORES_SCHEMA.field(name).nullable
        columns[name] = pa.array(values, pa.float32(), mask=np.isnan(values) if nullable else None)
    return pa.table([columns[f.name] for f in SCORES_SCHEMA], schema=SCORES_SCHEMA)
