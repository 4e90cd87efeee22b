"""bench/gpu_session.sh and the GPU scripts' own logic, on a CPU: the image's package list and the
closure `fetch` carries, the run's stops and budgets, and the fixes to the checks and loops that the
GPU run depends on (no Ray, no network)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest
import torch

from tests import paths

REPO = str(paths.REPO)
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import gpu_session  # noqa: E402  (bench/ is not a package)
from gpu_session import Requirement, closure, read_image_list  # noqa: E402

ENV_311 = dict(gpu_session.TARGET_ENV, python_version="3.11", python_full_version="3.11.7")


# ---------------------------------------------------------------------------------------------
# The image's package list
# ---------------------------------------------------------------------------------------------
def test_image_list_pins_the_published_versions_and_lacks_ray_and_diffusers():
    image = read_image_list()
    pins = {name: str(gpu_session.pinned_version(req)) for name, req in image.items()
            if gpu_session.pinned_version(req) is not None}
    assert {k: pins[k] for k in ("torch", "torchvision", "transformers", "huggingface-hub", "safetensors",
                                 "tokenizers", "numpy")} == {
        "torch": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
        "safetensors": "0.8.0", "tokenizers": "0.23.2", "numpy": "2.5.2"}
    assert len(image) == 197  # every name of the published list
    for absent in ("ray", "s3fs", "boto3", "diffusers", "importlib-metadata"):
        assert absent not in image
    # numpy 2.5 has no wheel for Python 3.11: there the list asks for the nearest below
    assert str(read_image_list(env=ENV_311)["numpy"].specifier) == "<=2.5.2"


def test_pyproject_admits_the_gpu_image_versions():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    image = read_image_list()
    checked = []
    for req in deps:
        have = image.get(gpu_session.normalize(req.name))
        version = have is not None and gpu_session.pinned_version(have)
        if version:
            assert req.specifier.contains(version), f"pyproject's {req} refuses the GPU image's {req.name} {version}"
            checked.append(req.name)
    assert {"torch", "torchvision", "transformers", "safetensors", "numpy"} <= set(checked)


# ---------------------------------------------------------------------------------------------
# fetch: the closure of the carried wheels' requirements
# ---------------------------------------------------------------------------------------------
def make_wheel(folder, name: str, version: str, requires: list[str]) -> str:
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


class FakeIndex:
    """pip download's behaviour over a fixed index: the newest version meeting the specifier."""

    def __init__(self, folder, packages: dict[str, dict[str, list[str]]]):
        self.folder, self.packages, self.calls = folder, packages, []

    def __call__(self, name: str, spec: str) -> str:
        from gpu_session import SpecifierSet, Version

        self.calls.append((name, spec))
        versions = sorted((v for v in self.packages[name] if SpecifierSet(spec).contains(v)), key=Version)
        return make_wheel(self.folder, name, versions[-1], self.packages[name][versions[-1]])


def test_closure_carries_what_the_image_lacks_once_and_says_why(tmp_path):
    image = {n: Requirement(r) for n, r in (("b", "b==2.0"), ("d", "d==2.0"), ("g", "g"))}
    index = FakeIndex(str(tmp_path), {
        "a": {"1.0": ["b>=1", "c", "d>=3", "e; extra == 'test'", "f; python_version < '3.10'", "g>=1"]},
        "c": {"1.0": ["h", "d<4"]},
        "d": {"3.5": [], "4.0": []},
        "h": {"0.1": ["b"]},
    })
    result = closure([Requirement("a==1.0")], image, index)
    assert {k: v[0] for k, v in result.carried.items()} == {"a": "1.0", "c": "1.0", "d": "3.5", "h": "0.1"}
    assert sorted(result.missing) == ["c", "h"] and result.missing["h"] == ["c 1.0"]
    assert "d" in result.too_old and "needs >=3" in result.too_old["d"]
    assert result.unknown == {"g": [">=1 (a 1.0)"]}
    # d was fetched at 4.0 first, then again under >=3,<4: one wheel of it is left
    assert sorted(os.listdir(tmp_path)) == ["a-1.0-py3-none-any.whl", "c-1.0-py3-none-any.whl",
                                            "d-3.5-py3-none-any.whl", "h-0.1-py3-none-any.whl"]
    assert ("e" not in index.packages) and all(n not in ("e", "f", "b") for n, _ in index.calls)


def test_closure_of_diffusers_against_the_image_list(tmp_path):
    """The real requirements of the pinned diffusers (read from the installed distribution's metadata)
    against the real image list: what the image lacks is exactly what fetch must carry."""
    from importlib.metadata import distribution

    pin = gpu_session.constraint_pin("diffusers")
    dist = distribution("diffusers")
    assert pin == f"diffusers=={dist.version}"
    metadata = {"diffusers": {dist.version: dist.requires or []}}
    for name in ("importlib_metadata", "lazy-importer"):
        d = distribution(name)
        metadata[gpu_session.normalize(name)] = {d.version: d.requires or []}
    result = closure([Requirement(pin)], read_image_list(), FakeIndex(str(tmp_path), metadata))
    assert sorted(result.carried) == ["diffusers", "importlib-metadata", "lazy-importer"]
    assert not result.too_old  # huggingface-hub 1.33 and safetensors 0.8 meet diffusers' floors


# ---------------------------------------------------------------------------------------------
# run: the import stop, the toolchain check, the parts' budgets and figures
# ---------------------------------------------------------------------------------------------
def test_imports_cover_what_test_without_ray_imports():
    from tests.test_without_ray import MODULES

    assert set(MODULES) <= {m for m, _ in gpu_session.IMPORTS}


@pytest.mark.slow
def test_run_stops_with_exit_2_when_an_import_fails(tmp_path):
    broken = tmp_path / "site" / "diffusers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError(\"No package metadata was found for requests\")\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_session.py"), "run", "--small", "--out", str(out),
                           "--work", str(tmp_path / "work"), "smoke", "generate"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "IMPORT FAILED  diffusers.StableDiffusionImg2ImgPipeline: ImportError: No package metadata" in proc.stdout
    assert sorted(os.listdir(out)) == ["env.json", "session.log"]  # no part ran, no model was written
    assert not (tmp_path / "work" / "model-tiny").exists()
    assert "diffusers.StableDiffusionImg2ImgPipeline" in json.loads((out / "env.json").read_text())["failed"]


def test_compile_toolchain_check_and_parts_without_it(tmp_path):
    assert gpu_session.compile_toolchain(which=lambda name: None, include=str(tmp_path)) == [
        "a C compiler (cc/gcc/clang on PATH)", f"Python.h (not in {tmp_path}: the python3-dev headers)"]
    (tmp_path / "Python.h").write_text("")
    assert gpu_session.compile_toolchain(which=lambda name: f"/usr/bin/{name}", include=str(tmp_path)) == []

    def command(name, compile_ok):
        return gpu_session.part_command(name, "python3", False, "/m", "/r.json", 100, compile_ok)

    assert command("generate-compile", False) is None and command("finetune-compile", False) is None
    full = command("generate-full", False)
    assert full[full.index("--compile") + 1] == "off"
    assert "--compile" not in command("generate-full", True)
    assert command("generate-compile", True)[command("generate-compile", True).index("--compile") + 1] == "on"


def test_small_settings_run_on_cpu_and_gpu_settings_on_cuda():
    for name in gpu_session.PARTS:
        small = gpu_session.part_command(name, "py", True, "/m", "/r.json", 100, True)
        gpu = gpu_session.part_command(name, "py", False, "/m", "/r.json", 100, True)
        assert small.count("--device") == 1 and small[small.index("--device") + 1] == "cpu", name
        assert "cpu" not in gpu, name


def test_every_part_command_is_one_its_script_accepts_and_names_its_results_file():
    """The session hands each script --json (where the part's figures are read from), --model and
    --budget-s; the scripts' harness must accept them in both settings."""
    import importlib

    for name in gpu_session.PARTS:
        for small in (False, True):
            cmd = gpu_session.part_command(name, "py", small, "/m", "/r.json", 100, True)
            script = importlib.import_module(os.path.basename(cmd[1])[:-3])
            args = script.bench.parse(cmd[2:])
            assert args.json == "/r.json", name
            assert script.bench.path("cpu", args.json) == "/r.json"


PART = textwrap.dedent("""
    import json, sys, time
    json.dump({"measured": 1}, open(sys.argv[1], "w"))
    print("partial figures written", flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(120)
    sys.exit(int(sys.argv[2]) if sys.argv[2] != "sleep" else 0)
""")


@pytest.mark.parametrize("mode, status, rc", [("0", "ok", 0), ("3", "failed", 3), ("sleep", "timeout", None)])
def test_run_part_writes_its_json_as_it_ends_partial_figures_included(tmp_path, mode, status, rc):
    out, results = tmp_path / "out", str(tmp_path / "partial.json")
    out.mkdir()
    log = gpu_session.Log(str(out / "session.log"))
    record = gpu_session.run_part("demo", [sys.executable, "-c", PART, results, mode], 3.0, str(out), results, log)
    saved = json.loads((out / "demo.json").read_text())
    assert saved == record
    assert saved["status"] == status and saved["results"] == {"measured": 1}
    if rc is not None:
        assert saved["rc"] == rc
    else:
        assert saved["wall_s"] < 20  # killed at its budget, not left to run
    assert "[demo] partial figures written" in (out / "session.log").read_text()


# ---------------------------------------------------------------------------------------------
# The fixes in the GPU scripts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from diffmix_ray.models.presets import write_preset

    return write_preset("tiny", str(tmp_path_factory.mktemp("gpu-session") / "tiny"))


def test_scripts_loop_restores_the_vocabulary_under_the_gpu_precision_policy(tiny_model):
    """The fine-tune bench's `scripts` loop with bf16 frozen weights, as on a GPU, built on a CPU: the
    rows to restore are copied after the trained matrix became fp32, so the restore after each
    optimizer step works (the copy taken before it was bf16: `Index put requires the source and
    destination dtypes match`). The step itself is not run here: CPU autocast has no bf16 layer_norm
    for fp32 inputs, which CUDA's autocast runs in fp32."""
    import bench_finetune_step as bench

    s = bench.Setup(tiny_model, torch.device("cpu"), torch.bfloat16, torch.bfloat16, batch_size=2, classes=3, rank=2,
                    seed=0)
    loop = bench.BareLoop(s, full_matrix=True)
    weight = loop.text_encoder.get_input_embeddings().weight
    assert weight.dtype == torch.float32 and loop.text_encoder.get_input_embeddings().weight.requires_grad
    assert loop.unet.dtype == torch.bfloat16  # the frozen weights keep the run's dtype
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step moved every row
    loop.restore_frozen_rows()
    frozen = loop.index_no_updates
    assert int((~frozen).sum()) == 3
    assert torch.equal(weight[frozen], before[frozen])
    assert torch.equal(weight[~frozen], before[~frozen] + 1.0)


def test_memory_meter_counts_only_what_a_variant_adds():
    import bench_finetune_step as bench

    class Stats:  # torch.cuda's counters, driven by the test
        allocated, peak = 5 * 2**30, 7 * 2**30

        def memory_allocated(self, device):
            return self.allocated

        def max_memory_allocated(self, device):
            return self.peak

        def reset_peak_memory_stats(self, device):
            self.peak = self.allocated

    stats = Stats()
    meter = bench.MemoryMeter("cuda", stats)  # 5 GiB held by earlier variants
    stats.allocated, stats.peak = 7 * 2**30, 9.5 * 2**30  # this variant: 2 GiB of models, 4.5 GiB at its peak
    assert meter.own_peak_gib() == 4.5


def test_effective_steps_runs_until_three_steps_were_not_skipped():
    import gpu_smoke

    class Scaler:  # a GradScaler whose gradients overflow for the first `skips` steps: each halves its scale
        def __init__(self, skips, enabled=True):
            self.scale, self.skips, self.enabled = 65536.0, skips, enabled

        def is_enabled(self):
            return self.enabled

        def get_scale(self):
            return self.scale

    class Tuner:
        def __init__(self, scaler):
            self.scaler, self.steps = scaler, []

        def train_step(self, batch, step):
            self.steps.append(step)
            if self.scaler.skips:
                self.scaler.skips -= 1
                self.scaler.scale /= 2
            return torch.tensor(0.5)

    tuner = Tuner(Scaler(skips=5))
    losses, skipped = gpu_smoke.effective_steps(tuner, [None, None], want=3, limit=24)
    assert (len(losses), skipped, tuner.steps) == (8, 5, list(range(1, 9)))
    losses, skipped = gpu_smoke.effective_steps(Tuner(Scaler(skips=30)), [None], want=3, limit=24)
    assert (len(losses), skipped) == (24, 24)  # the check then fails: no step taken
    losses, skipped = gpu_smoke.effective_steps(Tuner(Scaler(0, enabled=False)), [None], want=3, limit=24)
    assert (len(losses), skipped) == (3, 0)


def test_resume_gap_is_relative_to_the_step():
    import gpu_smoke

    g = torch.Generator().manual_seed(0)
    before = {"w": torch.randn(100, generator=g), "v": torch.randn(10, generator=g)}
    step = {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in before.items()}
    first = {k: before[k] + step[k] for k in before}
    assert gpu_smoke.resume_gap(before, first, {k: v.clone() for k, v in first.items()}) == 0.0
    noisy = {k: v + 1e-6 * torch.randn(v.shape, generator=g) for k, v in first.items()}  # nondeterministic kernels
    assert gpu_smoke.resume_gap(before, first, noisy) < gpu_smoke.RESUME_RTOL
    lost = {k: before[k] + 0.5 * step[k] for k in before}  # e.g. fresh optimizer moments: another step
    assert gpu_smoke.resume_gap(before, first, lost) > 0.4


def test_decode_check_uses_444_jpegs_and_passes_on_cpu():
    from PIL import Image, JpegImagePlugin

    import gpu_smoke

    jpegs = gpu_smoke.smoke_jpegs(2)
    assert all(JpegImagePlugin.get_sampling(Image.open(io.BytesIO(j))) == 0 for j in jpegs)  # 0: 4:4:4
    ok, detail = gpu_smoke.decode_check(torch.device("cpu"))
    assert ok, detail


@pytest.mark.slow
def test_invariance_check_translates_pairs_of_one_strength_in_one_batch(tmp_path, tiny_model):
    import gpu_smoke

    model, dataset, bank = gpu_smoke.make_inputs(str(tmp_path), "tiny", "cpu", tiny_model)
    gpu_smoke.RESULTS.clear()
    gpu_smoke.translate_checks(model, dataset, bank, "cpu")
    results = {name: (ok, detail) for name, ok, detail in gpu_smoke.RESULTS}
    ok, detail = results["translate invariance"]
    assert ok and detail.startswith("together: device batches [8];"), detail
    assert results["translate float32"][0]


def test_tuned_bare_loop_makes_the_naive_loops_images(tmp_path, tiny_model):
    """(t) fuses the LoRA, caches the prompts and encodes a batch at once: the same images as (a)."""
    import bench_generate_gpu as bench

    args = types.SimpleNamespace(preset="tiny", device="cpu", model=tiny_model, strength=0.7, steps=6)
    dataset, model, bank = bench.make_inputs(str(tmp_path), args, n_images=8)
    plan, sources = bench.plan_pairs(dataset, args, 4)
    naive, tuned = [], []
    pipe, loaded = bench.bare_pipeline(model, bank, "cpu")
    _, failed_a = bench.bare_loop(pipe, loaded, plan, sources, 4, args, keep=naive)
    _, failed_t = bench.tuned_loop(bench.tuned_pipeline(model, bank, "cpu", False), plan, sources, 4, args, keep=tuned)
    assert failed_a == failed_t == 0 and len(naive) == len(tuned) == 4
    diff = np.abs(np.stack(naive).astype(int) - np.stack(tuned).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert np.abs(np.stack(naive).astype(int) - np.roll(np.stack(tuned), 1, axis=0).astype(int)).mean() > 2
