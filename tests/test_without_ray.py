"""The GPU scripts and the per-batch code run where Ray is not installed (a rented GPU machine may
lack it, and its wheel is too large to carry): importing them must not import Ray."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported by bench/gpu_smoke.py, bench/bench_generate_gpu.py (a, b), bench/bench_finetune_step.py and
# bench/bench_score.py --gpu.
MODULES = [
    "diffmix_ray.generate.translate", "diffmix_ray.generate.cpu_stages", "diffmix_ray.generate.plan",
    "diffmix_ray.generate.config", "diffmix_ray.models.concepts", "diffmix_ray.models.loader",
    "diffmix_ray.data.prepare", "diffmix_ray.data.sample", "diffmix_ray.finetune.run",
    "diffmix_ray.finetune.loop", "diffmix_ray.finetune.data", "diffmix_ray.classify.model",
    "diffmix_ray.score.scorer", "diffmix_ray.score.cpu_stages", "diffmix_ray.models.clip",
    "diffmix_ray.classify.step", "diffmix_ray.classify.mixing", "diffmix_ray.classify.convert",
    "diffmix_ray.finetune.token_optim",
]


def test_per_batch_code_and_gpu_scripts_import_without_ray():
    code = ("import sys; sys.modules['ray'] = None  # `import ray` now raises ImportError\n"
            f"import importlib; [importlib.import_module(m) for m in {MODULES!r}]\n"
            "sys.path.insert(0, 'bench'); import gpu_smoke, bench_generate_gpu, bench_finetune_step\n"
            "import bench_score, _harness, _inputs, _score_parts\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-3000:]
