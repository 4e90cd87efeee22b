"""The logic behind bench/gpu_session.sh (run it through that script; see bench/README.md).

  fetch          the carried wheels (diffusers, as constraints.txt pins it) and the whole closure of their
                 Requires-Dist that the GPU image lacks (bench/gpu_image.txt), one version of each, into .whl/
  install-image  into this interpreter's environment: the image's package list and nothing else
  run            the import check (exit 2 on any failure), the compile toolchain check, one shared model
                 folder, then each part under its own time budget; each part's figures go to
                 $OUT/<part>.json as soon as the part ends, and the run ends in one PASS/FAIL line per part

Standard library only at import (and `packaging`, or pip's copy of it, for the requirement logic): it runs
before anything is installed."""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

from _harness import write_json  # beside this file; standard library only

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
IMAGE_LIST = os.path.join(BENCH, "gpu_image.txt")
# The GPU machine's interpreter, for the markers of the image list and of the wheels' requirements.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
              "os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "platform_release": "", "platform_version": "", "extra": ""}
PIP_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64"]
# What the image lacks and the parts need: carried as wheels (pins from constraints.txt).
CARRIED = ("diffusers",)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# The image's package list and the wheels' requirements
# ---------------------------------------------------------------------------------------------
def read_image_list(path: str = IMAGE_LIST, env: dict | None = None) -> dict[str, Requirement]:
    """name -> requirement of every package the image has (markers evaluated for `env`, default the
    GPU machine's). A bare name means: there, version unknown."""
    env = env or TARGET_ENV
    out: dict[str, Requirement] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                out[normalize(req.name)] = req
    return out


def pinned_version(req: Requirement) -> Version | None:
    """The version an `==` pin names, else None."""
    pins = [s.version for s in req.specifier if s.operator == "=="]
    return Version(pins[0]) if len(pins) == 1 else None


def wheel_metadata(path: str) -> tuple[str, str, list[Requirement]]:
    """(name, version, Requires-Dist) of a wheel file, read from its METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg["Name"], msg["Version"], [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def applies(req: Requirement, env: dict | None = None) -> bool:
    """Whether a Requires-Dist line applies on the target (no extras asked for)."""
    return req.marker is None or req.marker.evaluate(dict(env or TARGET_ENV, extra=""))


@dataclasses.dataclass
class Closure:
    carried: dict[str, tuple[str, str]]  # name -> (version, wheel path)
    missing: dict[str, list[str]]  # carried because the image lacks it: name -> the packages that need it
    unknown: dict[str, list[str]]  # in the image, version not published: name -> the specifiers assumed met
    too_old: dict[str, str]  # in the image at a version the wheels refuse: name -> "image X, needs SPEC"


def closure(roots: list[Requirement], image: dict[str, Requirement], download, env: dict | None = None) -> Closure:
    """Everything to carry so that `roots` import on the image: the roots, and every requirement of
    a carried wheel that the image does not satisfy, recursively. `download(name, specifier)` returns
    the path of a wheel of the newest version meeting the specifier. One version of each package:
    when a later requirement narrows a package already fetched, it is fetched again under both."""
    wanted: dict[str, SpecifierSet] = {}
    needed_by: dict[str, list[str]] = {}
    carried: dict[str, tuple[str, str]] = {}
    out = Closure(carried, {}, {}, {})
    queue = [(r, "(carried)") for r in roots]
    while queue:
        req, parent = queue.pop(0)
        if not applies(req, env):
            continue
        name = normalize(req.name)
        needed_by.setdefault(name, []).append(parent)
        spec = wanted[name] = wanted.get(name, SpecifierSet()) & req.specifier  # every requirement on it so far
        if name in carried:  # the carried wheel is what imports there: it must meet them all
            if spec.contains(carried[name][0], prereleases=True):
                continue
            os.remove(carried[name][1])
        elif parent != "(carried)":
            have = image.get(name)
            if have is None:
                out.missing[name] = needed_by[name]
            elif (version := pinned_version(have)) is None:
                if str(req.specifier):
                    out.unknown.setdefault(name, []).append(f"{req.specifier} ({parent})")
                continue
            elif spec.contains(version, prereleases=True):
                continue
            else:
                out.too_old[name] = f"image {version}, {parent} needs {req.specifier}"
        path = download(name, str(spec))
        wheel_name, version, requires = wheel_metadata(path)
        carried[name] = (version, path)
        queue.extend((r, f"{wheel_name} {version}") for r in requires)
    return out


def constraint_pin(name: str) -> str:
    """`name==version` as constraints.txt pins it."""
    with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            if normalize(line.split("==")[0].strip()) == normalize(name):
                return line.strip()
    raise SystemExit(f"constraints.txt pins no {name}; add it there")


def pip_download(dest: str, python: str = sys.executable):
    """A download function for closure(): pip, wheels only, for the GPU machine's interpreter."""
    def download(name: str, spec: str) -> str:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.12", "--implementation", "cp", *[a for p in PIP_PLATFORMS for a in ("--platform", p)],
                   "-d", tmp, f"{name}{spec}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)  # pip's warnings only if it fails
            if proc.returncode:
                raise SystemExit(f"pip download {name}{spec} failed:\n{proc.stderr[-3000:]}")
            (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
            path = os.path.join(dest, os.path.basename(wheel))
            shutil.move(wheel, path)
        return path
    return download


def fetch(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for old in glob.glob(os.path.join(dest, "*.whl")):  # one version of each: start clean
        os.remove(old)
    image = read_image_list()
    roots = [Requirement(constraint_pin(name)) for name in CARRIED]
    result = closure(roots, image, pip_download(dest))
    total = 0
    for name, (version, path) in sorted(result.carried.items()):
        size = os.path.getsize(path)
        total += size
        why = f"  (the image lacks it; needed by {', '.join(result.missing[name])})" if name in result.missing else ""
        if name in result.too_old:
            why = f"  (the image's is too old: {result.too_old[name]})"
        print(f"  {os.path.basename(path):<60} {size / 2**20:6.1f} MiB{why}")
    print(f"{len(result.carried)} wheels, {total / 2**20:.1f} MiB in {dest}")
    print("missing from the image: " + (", ".join(sorted(result.missing)) or "nothing") + "; the image's version "
          "too old: " + (", ".join(sorted(result.too_old)) or "nothing"))
    for name, specs in sorted(result.unknown.items()):
        print(f"  assumed met (the image's {name} version is not published): {'; '.join(specs)}")


# ---------------------------------------------------------------------------------------------
# The emulation's environment
# ---------------------------------------------------------------------------------------------
def _pip(args: list[str]) -> None:
    """pip in this interpreter, its output shown but for the warnings about index folders that lack a
    package (an extra local index lists few of them)."""
    proc = subprocess.Popen([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if not line.startswith("WARNING: Location "):
            print(line, end="", flush=True)
    if proc.wait():
        raise SystemExit(f"pip {' '.join(args[:2])} failed (exit {proc.returncode})")


def install_image(list_path: str = IMAGE_LIST) -> None:
    """Into this interpreter's environment: exactly the image's packages. pip resolves the list (bare
    names get the newest versions consistent with the pins), then only the listed names are installed,
    without their dependencies: whatever else the resolution pulled in is left out, as the image lacks it."""
    env = {k: v for k, v in TARGET_ENV.items()}
    env.update(python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
               python_full_version=sys.version.split()[0])
    listed = read_image_list(list_path, env)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        _pip(["install", "-q", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--report", report, "-r",
              list_path])
        with open(report, encoding="utf-8") as f:
            resolved = {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(f)["install"]}
        pins = os.path.join(tmp, "pins.txt")
        with open(pins, "w", encoding="utf-8") as f:
            f.writelines(f"{name}=={resolved[name]}\n" for name in sorted(listed) if name in resolved)
        _pip(["install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:", "-r", pins])
    left_out = sorted(set(resolved) - set(listed))
    absent = sorted(set(listed) - set(resolved) - {"pip"})
    print(f"installed the image's {len(listed)} packages; left out (pulled in by pip's resolution, not in the "
          f"image's list): {', '.join(left_out) or 'nothing'}" + (f"; not resolved: {', '.join(absent)}" if absent
                                                                    else ""))


# ---------------------------------------------------------------------------------------------
# run: imports, toolchain, model, parts
# ---------------------------------------------------------------------------------------------
# (module, attribute or None): what the parts import, lazily included. tests/bench/test_gpu_session.py keeps
# this a superset of tests/test_without_ray.py's list.
IMPORTS = [
    ("torch", None), ("torchvision.io", "decode_jpeg"), ("torchvision.transforms.v2", None), ("numpy", None),
    ("PIL.Image", None), ("safetensors.torch", "save_file"), ("huggingface_hub", None), ("tokenizers", None),
    ("transformers", "CLIPTokenizer"), ("transformers", "CLIPTextModel"), ("transformers", "CLIPModel"),
    ("peft", "LoraConfig"), ("peft.utils", "get_peft_model_state_dict"), ("timm", "create_model"),
    ("diffusers", "StableDiffusionImg2ImgPipeline"), ("diffusers", "StableDiffusionPipeline"),
    ("diffusers", "DPMSolverMultistepScheduler"), ("diffusers", "DDPMScheduler"),
    ("diffusers", "UNet2DConditionModel"), ("diffusers", "AutoencoderKL"),
    ("diffusers.training_utils", "cast_training_params"), ("pyarrow.parquet", None), ("fsspec", None),
    ("yaml", None), ("psutil", None),
    ("diffmix_ray.generate.translate", None), ("diffmix_ray.generate.cpu_stages", None),
    ("diffmix_ray.generate.plan", None), ("diffmix_ray.generate.config", None), ("diffmix_ray.models.concepts", None),
    ("diffmix_ray.models.loader", None), ("diffmix_ray.models.presets", None), ("diffmix_ray.models.spec", None),
    ("diffmix_ray.models.classifier", None), ("diffmix_ray.data.prepare", None),
    ("diffmix_ray.data.sample", None), ("diffmix_ray.finetune.run", None), ("diffmix_ray.finetune.loop", None),
    ("diffmix_ray.finetune.data", None), ("diffmix_ray.classify.model", None), ("diffmix_ray.classify.step", None),
    ("diffmix_ray.classify.gpu_decode", None), ("diffmix_ray.classify.transforms", None),
    ("diffmix_ray.classify.mixing", None), ("diffmix_ray.classify.convert", None),
    ("diffmix_ray.finetune.token_optim", None),
    ("diffmix_ray.score.scorer", None), ("diffmix_ray.score.cpu_stages", None), ("diffmix_ray.models.clip", None),
    ("_harness", None), ("_inputs", None), ("_score_parts", None), ("gpu_smoke", None), ("bench_generate_gpu", None),
    ("bench_finetune_step", None), ("bench_score", None), ("bench_classify_step", None),
]
VERSIONS = ["torch", "torchvision", "diffusers", "transformers", "huggingface_hub", "peft", "timm", "safetensors",
            "tokenizers", "numpy", "PIL", "pyarrow", "triton"]

_IMPORT_CHECK = r"""
import importlib, json, sys
sys.path.insert(0, {bench!r})
failed = {{}}
for module, attr in {imports!r}:
    try:
        m = importlib.import_module(module)
        if attr is not None:
            getattr(m, attr)
    except Exception as e:
        failed[module + ("." + attr if attr else "")] = f"{{type(e).__name__}}: {{e}}"
versions = {{}}
for name in {versions!r}:
    try:
        versions[name] = importlib.import_module(name).__version__
    except Exception:
        versions[name] = None
import torch
cuda = torch.cuda.is_available()
absent = [n for n in ("ray", "s3fs", "boto3") if importlib.util.find_spec(n) is not None]
print(json.dumps({{"failed": failed, "versions": versions, "cuda": cuda, "python": sys.version.split()[0],
                  "importable_but_not_in_the_image": absent}}))
"""


def check_imports(python: str) -> dict:
    """Import everything the parts use in a fresh interpreter; {"failed": {what: error}, "versions": ...}."""
    code = _IMPORT_CHECK.format(bench=BENCH, imports=IMPORTS, versions=VERSIONS)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"failed": {"the import check itself": (proc.stderr or proc.stdout)[-2000:]}, "versions": {}}


def compile_toolchain(which=shutil.which, include: str | None = None) -> list[str]:
    """What torch.compile lacks here: Triton (GPU) and inductor's C++ path (CPU) build C code with a C
    compiler against Python.h at their first kernel. Returns the missing pieces ([] = can compile)."""
    missing = []
    if not any(which(cc) for cc in (os.environ.get("CC", "cc"), "cc", "gcc", "clang")):
        missing.append("a C compiler (cc/gcc/clang on PATH)")
    include = include if include is not None else sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        missing.append(f"Python.h (not in {include}: the python3-dev headers)")
    return missing


@dataclasses.dataclass(frozen=True)
class Part:
    script: list[str]  # bench/<script> and its arguments on a GPU
    small: list[str]  # its arguments with --device cpu at small settings (emulate)
    budget_s: float  # on a GPU
    small_budget_s: float  # here, at small settings
    compiles: bool = False
    uses_model: bool = True


PARTS: dict[str, Part] = {
    "smoke": Part(["gpu_smoke.py"], ["--device", "cpu"], 85, 240),
    "generate": Part(["bench_generate_gpu.py", "--quick", "--compile", "off", "--no-system"],
                     ["--device", "cpu", "--batch-sizes", "2", "--batches", "1", "--steps", "10"], 65, 200),
    "generate-compile": Part(["bench_generate_gpu.py", "--quick", "--compile", "on", "--no-system"],
                             ["--device", "cpu", "--batch-sizes", "2", "--batches", "1", "--steps", "10"], 150, 400,
                             compiles=True),
    "generate-full": Part(["bench_generate_gpu.py", "--no-system"],
                          ["--device", "cpu", "--batch-sizes", "2,4", "--batches", "1", "--steps", "10"], 300, 400,
                          compiles=True),
    "score": Part(["bench_score.py", "--gpu"], ["--gpu", "--device", "cpu", "--clip", "tiny", "--batch-size", "16",
                                                "--batches", "3", "--classes", "20"], 40, 120, uses_model=False),
    "finetune": Part(["bench_finetune_step.py", "--device", "cuda", "--variants", "scripts,minimal,project,project-gc"],
                     ["--device", "cpu", "--classes", "20", "--rounds", "2", "--steps", "2", "--warmup", "1"],
                     100, 240),
    "finetune-compile": Part(["bench_finetune_step.py", "--device", "cuda", "--variants", "project,project-compile"],
                             ["--device", "cpu", "--classes", "20", "--rounds", "2", "--steps", "2", "--warmup", "1"],
                             150, 400, compiles=True),
    "classify": Part(["bench_classify_step.py", "--device", "cuda"],
                     ["--device", "cpu", "--augment", "timm", "--res-mode", "64", "--batch-size", "4", "--images", "8",
                      "--steps", "1", "--rounds", "2", "--warmup", "1"], 75, 180, uses_model=False),
}
DEFAULT_PARTS = ["smoke", "generate", "generate-compile", "score"]
# A compile part without a toolchain: the part that runs instead (compile off), or None to skip it.
WITHOUT_COMPILE = {"generate-compile": None, "generate-full": ["--compile", "off"], "finetune-compile": None}


def part_command(name: str, python: str, small: bool, model: str | None, results: str, budget_s: float,
                 compile_ok: bool) -> list[str] | None:
    part = PARTS[name]
    args = _last_device(list(part.script) + (part.small if small else []))  # small settings name cpu
    if part.compiles and not compile_ok:
        extra = WITHOUT_COMPILE.get(name)
        if extra is None:
            return None
        args += extra
    if part.uses_model and model:
        args += ["--model", model]
    if name.startswith("generate"):
        args += ["--budget-s", f"{max(10.0, 0.9 * budget_s - 5):.0f}"]
    return [python, os.path.join(BENCH, args[0]), *args[1:], "--json", results]


def _last_device(args: list[str]) -> list[str]:
    """Keep the last --device value (a part's small settings override its GPU default)."""
    out, device = [], None
    i = 0
    while i < len(args):
        if args[i] == "--device" and i + 1 < len(args):
            device = args[i + 1]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out + (["--device", device] if device else [])


class Log:
    """Lines to stdout and to $OUT/session.log."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")
            self.f.flush()


def run_part(name: str, cmd: list[str], budget_s: float, out: str, results: str, log: Log,
             env: dict | None = None) -> dict:
    """Run one part in its own process group, killed at its budget; then write $OUT/<name>.json with
    its status and whatever figures the script had written to `results` (partial ones survive a kill)."""
    if os.path.exists(results):
        os.remove(results)
    shown = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd)
    log(f"=== {name} (budget {budget_s:.0f} s): {shown}")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, env=env, bufsize=1, errors="replace")
    reader = threading.Thread(target=lambda: [log(f"[{name}] {line.rstrip()}") for line in proc.stdout], daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - started
    figures = None
    if os.path.exists(results):
        with open(results, encoding="utf-8") as f:
            figures = json.load(f)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    record = {"part": name, "status": status, "rc": proc.returncode, "wall_s": round(wall, 1),
              "budget_s": budget_s, "command": cmd, "results": figures}
    write_json(os.path.join(out, f"{name}.json"), record)
    log(f"=== {name}: {status} in {wall:.0f} s (figures in {os.path.join(out, name + '.json')})")
    return record


def shared_model(work: str, preset: str, log: Log, python: str, budget_s: float, device: str) -> str:
    """One model folder for every part (written once; model_index.json is written last, so its
    presence means the folder is complete: a later command on the same machine reuses it)."""
    folder = os.path.join(work, f"model-{preset}")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        log(f"model: reusing {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    dtype = "float16" if device == "cuda" else "float32"
    t = time.perf_counter()
    code = (f"from diffmix_ray.models.loader import write_model; write_model({preset!r}, {folder!r}, dtype={dtype!r})")
    subprocess.run([python, "-c", code], check=True, cwd=REPO, timeout=budget_s,
                   env=dict(os.environ, TQDM_DISABLE="1"))
    log(f"model: {preset} ({dtype}) written to {folder} in {time.perf_counter() - t:.0f} s")
    return folder


def run(args) -> int:
    out = os.path.abspath(args.out)
    work = os.path.abspath(args.work)
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(work, "results"), exist_ok=True)
    log = Log(os.path.join(out, "session.log"))
    started = time.perf_counter()
    parts = args.parts or DEFAULT_PARTS
    if unknown := [p for p in parts if p not in PARTS]:
        log(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
        return 2
    python = args.python
    env_info = {"parts": parts, "small": args.small, "python_exe": python}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env_info["gpu"] = smi.stdout.strip() or smi.stderr.strip()
        log(f"gpu: {env_info['gpu']}")
    imports = check_imports(python)
    env_info |= imports
    if imports["failed"]:
        for what, err in imports["failed"].items():
            log(f"IMPORT FAILED  {what}: {err}")
        log("stopping: fix the environment (carry the missing wheels: `bash bench/gpu_session.sh fetch`, or add "
            "the package to bench/gpu_image.txt only if the image really has it) before any part runs")
        write_json(os.path.join(out, "env.json"), env_info)
        return 2
    versions = ", ".join(f"{k} {v}" for k, v in imports["versions"].items() if v)
    log(f"imports: all {len(IMPORTS)} ok; python {imports['python']}; {versions}; cuda {imports['cuda']}"
        + (f"; importable here, absent on the GPU machine: {', '.join(extra)}" if (extra := imports.get(
            "importable_but_not_in_the_image")) else ""))
    if not args.small and not imports["cuda"]:
        log("stopping: torch sees no CUDA device (use `emulate` or `run --small` on a CPU)")
        write_json(os.path.join(out, "env.json"), env_info)
        return 2
    missing = compile_toolchain()
    compile_ok = not missing
    env_info["compile_toolchain_missing"] = missing
    if missing and any(PARTS[p].compiles for p in parts):
        log(f"compile: OFF, this machine lacks {' and '.join(missing)}: compile parts are skipped "
            "(generate-full runs with compile off)")
    device = "cpu" if args.small else "cuda"
    model = None
    if any(PARTS[p].uses_model for p in parts):
        preset = args.preset or ("tiny" if args.small else "sd15")
        try:
            model = shared_model(work, preset, log, python, args.model_budget_s, device)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log(f"stopping: writing the {preset} model failed ({e})")
            write_json(os.path.join(out, "env.json"), env_info)
            return 2
        env_info["model"] = model
    write_json(os.path.join(out, "env.json"), env_info)
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    records = []
    for name in parts:
        part = PARTS[name]
        budget = (part.small_budget_s if args.small else part.budget_s) * args.budget_scale
        results = os.path.join(work, "results", f"{name}.json")
        cmd = part_command(name, python, args.small, model, results, budget, compile_ok)
        if cmd is None:
            record = {"part": name, "status": "skipped", "reason": f"compile needs {' and '.join(missing)}"}
            write_json(os.path.join(out, f"{name}.json"), record)
            log(f"=== {name}: skipped (compile needs {' and '.join(missing)})")
        else:
            record = run_part(name, cmd, budget, out, results, log, child_env)
        records.append(record)
    log(f"--- {len(parts)} part(s) in {time.perf_counter() - started:.0f} s (start-up included); figures in {out}")
    for r in records:
        verdict = "PASS" if r["status"] == "ok" else ("SKIP" if r["status"] == "skipped" else "FAIL")
        detail = r.get("reason") or f"{r['status']} in {r['wall_s']:.0f} s of {r['budget_s']:.0f}"
        log(f"{verdict}  {r['part']:<17} {detail}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--dest", default=os.path.join(REPO, ".whl"))
    i = sub.add_parser("install-image")
    i.add_argument("--list", default=IMAGE_LIST)
    r = sub.add_parser("run")
    r.add_argument("parts", nargs="*", help=f"default: {' '.join(DEFAULT_PARTS)}; all: {' '.join(PARTS)}")
    r.add_argument("--small", action="store_true", help="--device cpu at small settings (the emulation)")
    r.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-session/out")
    r.add_argument("--work", default=os.environ.get("GPU_SESSION_WORK", "/tmp/gpu-session"),
                   help="the shared model folder and the parts' partial figures (kept between commands)")
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--preset", default=None, help="model preset (default sd15; tiny with --small)")
    r.add_argument("--model-budget-s", type=float, default=180.0)
    r.add_argument("--budget-scale", type=float, default=float(os.environ.get("GPU_SESSION_BUDGET_SCALE", "1")),
                   help="multiply every part's budget (a slower machine)")
    args = p.parse_args()
    if args.command == "fetch":
        fetch(args.dest)
    elif args.command == "install-image":
        install_image(args.list)
    else:
        sys.exit(run(args))


if __name__ == "__main__":
    main()
