"""`diffmix-ray demo`: every stage that exists, on built-in defaults (sample dataset, tiny model,
local Ray, local disk, CPU). Each step is the same code path a real run takes."""

from __future__ import annotations

import os
import time

from .. import storage
from ..console import console
from ..data.prepare import PrepareConfig, prepare
from ..data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder


def run_demo(out: str, overwrite: bool = False) -> dict[str, str]:
    out = storage.normalize(out)
    if storage.is_s3(out):
        from ..errors import DiffmixError

        raise DiffmixError("the demo writes to local disk; pass a local --out")
    t0 = time.perf_counter()
    raw = os.path.join(out, "raw")
    console.rule("[bold]1/1 prepare: built-in sample dataset -> canonical dataset")
    if overwrite or not os.path.isdir(raw):
        write_sample_imagefolder(raw)
    dataset = os.path.join(out, "dataset")
    prepare(PrepareConfig(format="imagefolder", source=raw, super_class=SAMPLE_SUPER_CLASS, name="sample",
                          val_fraction=0.2, test_fraction=0.2), dataset, overwrite=overwrite, show_progress=False)
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.1f} s[/green]: dataset at {dataset}")
    return {"raw": raw, "dataset": dataset}
