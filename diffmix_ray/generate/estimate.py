"""`diffmix-ray plan`: the plan a `generate` run would make, what it would write, and what it
would cost, without generating anything (or after translating a few pairs to calibrate)."""

from __future__ import annotations

import math
import time
from collections import Counter

from rich.table import Table

from ..console import console
from ..contracts import COL_IMAGE, COL_IMAGE_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL
from ..errors import DiffmixError
from .config import GenerateConfig
from .run import build_plan, resolve_inputs
from .translate import Translator, translate_locally


def calibrate_images_per_second(inputs, plan, pairs: int) -> tuple[float, float]:
    """Translate `pairs` plan rows on this machine through the generate stages (decode + resize,
    translation, resize + JPEG), one batch at a time; returns (images/s after the first batch,
    model start-up seconds). The first batch warms kernels and is not counted."""
    cfg = inputs.cfg
    info = inputs.dataset.info
    t0 = time.perf_counter()
    translator = Translator(cfg.model, cfg.kind, info.classes, info.super_class, concepts=cfg.concepts,
                            steps=cfg.steps, guidance=cfg.guidance, prompt_template=cfg.prompt_template,
                            threads=int(cfg.cpus_per_actor), batch_size=cfg.batch_size, compile=cfg.compile,
                            compile_cache=cfg.compile_cache)
    startup = time.perf_counter() - t0
    rows = plan.slice(0, max(pairs, cfg.batch_size * 2))
    by_id = {}
    if cfg.kind != "gen":
        train = inputs.dataset.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE])
        by_id = dict(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist()))
    timed_images, timed_seconds = 0, 0.0
    for k, start in enumerate(range(0, rows.num_rows, cfg.batch_size)):
        batch = rows.slice(start, cfg.batch_size)
        sources = None if cfg.kind == "gen" else [by_id[i] for i in batch.column(COL_SOURCE_ID).to_pylist()]
        t = time.perf_counter()
        translate_locally(translator, batch, sources, cfg.jpeg_quality)
        if k > 0:
            timed_images += batch.num_rows
            timed_seconds += time.perf_counter() - t
    if not timed_images:
        raise DiffmixError("--calibrate needs at least two batches of pairs")
    return timed_images / timed_seconds, startup


def estimate(cfg: GenerateConfig, images_per_second: float | None = None, calibrate: int | None = None) -> dict:
    inputs = resolve_inputs(cfg)
    inputs.print_resolved()
    plan = build_plan(inputs)
    n = plan.num_rows
    info = inputs.dataset.info
    train = inputs.dataset.read_split("train", columns=[COL_IMAGE])
    avg_bytes = sum(len(b) for b in train.column(COL_IMAGE).to_pylist()) / max(train.num_rows, 1)
    startup = None
    if calibrate:
        images_per_second, startup = calibrate_images_per_second(inputs, plan, calibrate)
    shards = math.ceil(n / cfg.rows_per_shard)
    result = {"pairs": n, "shards": shards, "bytes_estimate": int(n * avg_bytes),
              "per_target_class": dict(sorted(Counter(plan.column(COL_TARGET_LABEL).to_pylist()).items())),
              "per_source_class": dict(sorted(Counter(plan.column(COL_SOURCE_LABEL).to_pylist()).items())),
              "strengths": dict(sorted(Counter(round(s, 3) for s in plan.column(COL_STRENGTH).to_pylist()).items()))}
    table = Table(title=f"plan: {cfg.mode}, {n} pairs from {info.split_size('train')} train images, "
                        f"{info.num_classes} classes")
    for col in ("class", "as source", "as target"):
        table.add_column(col)
    for c, name in enumerate(info.classes):
        table.add_row(name, str(result["per_source_class"].get(c, 0)), str(result["per_target_class"].get(c, 0)))
    console.print(table)
    console.print(f"strengths: {result['strengths']}")
    console.print(f"shards: {shards} x <= {cfg.rows_per_shard} images, about {result['bytes_estimate'] / 2**20:.1f} MiB "
                  "(estimated from the source images' size)")
    if images_per_second:
        actors = cfg.max_actors
        wall_h = n / (images_per_second * actors) / 3600
        # Unset means "1 on a GPU cluster" (the generate default there): price the run that way.
        gpus = 1.0 if cfg.gpus_per_actor is None else cfg.gpus_per_actor
        gpu_h = n / images_per_second / 3600 * gpus
        result.update(images_per_second=images_per_second, wall_hours=wall_h, gpu_hours=gpu_h)
        source = "calibrated here" if calibrate else "given"
        console.print(f"throughput {images_per_second:.2f} images/s per actor ({source}"
                      + (f"; model start-up {startup:.1f} s" if startup is not None else "") + ")")
        console.print(f"estimate with {actors} actor(s): wall {wall_h * 60:.1f} min, "
                      f"{gpu_h:.2f} GPU-hours at {gpus:g} GPU/actor")
    else:
        console.print("pass --images-per-second or --calibrate N for a time and GPU-hour estimate")
    return result
