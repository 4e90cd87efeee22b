"""`diffmix-ray demo`: `run demo`, the recipe jobs/configs/paper/demo.yaml, through the same orchestrator
as every recipe (so a demo that works says `run` works). Every stage on built-in defaults: the sample
world's 12 classes, the `sample` model and CLIP trained on that world, a private local Ray, local disk,
CPU. Its report ends with what the sample world's judge (a colour-and-shape measurement, no model) sees
in the translations at each strength."""

from __future__ import annotations

import time

from .. import storage
from ..console import console
from ..errors import DiffmixError

DEMO_RECIPE = "demo"


def run_demo(out: str, overwrite: bool = False) -> dict:
    from .recipes import load
    from .run import run_recipe

    out = storage.normalize(out)
    if storage.is_s3(out):
        raise DiffmixError("the demo writes to local disk; pass a local --out (or use `diffmix-ray run demo --out "
                           "s3://...`)")
    started = time.perf_counter()
    result = run_recipe(load(DEMO_RECIPE), out, overwrite=overwrite)
    report = storage.join(out, "report")
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s: the report is {report}/table.html "
                  f"(the translations: {report}/contact-diff-mix.png; what the judge sees: {report}/judged.md)",
                  highlight=False, markup=False)
    return result
