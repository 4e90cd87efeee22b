"""A stage's driver (the CLI process, a Ray job's entrypoint on the head) plans the work and hands
it to Ray; the model libraries are loaded where models run: translation and scoring actors, Ray
Train workers. Importing diffusers, transformers and peft costs ~5 s of CPU and ~0.3 GB per
process, which every `diffmix-ray generate/score/finetune/run` and `model stage` would pay before
its first Ray call."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO

DRIVERS = ["diffmix_ray.cli", "diffmix_ray.generate.run", "diffmix_ray.score.run", "diffmix_ray.finetune.run",
           "diffmix_ray.classify.run", "diffmix_ray.orchestrate.run", "diffmix_ray.runtime.stage",
           "diffmix_ray.models.loader", "diffmix_ray.models.presets"]
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "tokenizers")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys; print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_stage_drivers_import_no_model_library():
    assert _loaded_after("".join(f"import {m}\n" for m in DRIVERS)) == "[]"


def test_resolving_models_loads_no_model_library():
    """What a generate or finetune driver does with --model: a preset's name, a folder (here the
    shipped sample model's) checked and fingerprinted."""
    code = ("from diffmix_ray.models.loader import resolve_model\n"
            "from diffmix_ray.models.sample import SAMPLE_SPEC, shipped\n"
            "for spec in ('tiny', SAMPLE_SPEC, shipped('sd')):\n"
            "    assert resolve_model(spec).fingerprint, spec")
    assert _loaded_after(code) == "[]"

