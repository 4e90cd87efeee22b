"""Turn a model spec into a ready Stable Diffusion pipeline, the same way on a laptop and a cluster.

A spec is one of:
  * a preset name, `tiny`, `bench` or `sd15`, optionally with a seed: `tiny:7` (built in memory,
    no files, random weights; see presets.py);
  * `sample`: the small SD-shaped model trained on the sample world, shipped in the package (a
    diffusers folder checked against its training record; see sample.py);
  * a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/);
    to use a folder named like a preset, write it as a path: `./tiny`;
  * `s3://bucket/prefix` holding such a folder: staged once per node into a local cache;
  * anything else is a Hugging Face hub id, downloaded through the hub cache unless HF_HUB_OFFLINE=1.

Folders (local, staged or hub snapshots) are always opened with local_files_only=True, so loading
a model never talks to the hub behind the user's back."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .. import storage
from ..errors import DiffmixError
from . import sample as sample_models
from .presets import PRESETS, build_pipeline, preset_config, resolve_write_dtype, write_preset

MODEL_INDEX = "model_index.json"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_KINDS = ("img2img", "text2img")
CACHE_ENV = "DIFFMIX_MODEL_CACHE"
DEFAULT_CACHE = "~/.cache/diffmix-ray/models"
STAGED_MARKER = ".diffmix-staged.json"  # written last into a staged copy: its presence means complete
_EDGE_BYTES = 1 << 20  # weight files are fingerprinted by their first and last MiB
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelRef:
    """Where a pipeline came from, for manifests and cache keys. Holds no secrets."""

    spec: str  # as given, minus any credentials
    kind: str  # "preset" | "sample" | "dir" | "s3" | "hub"
    local_path: str | None  # the folder actually loaded; None for presets
    fingerprint: str  # same fingerprint <=> same weights and configs
    resolution: int  # native image side in pixels: unet sample_size * VAE scale factor

    @property
    def location(self) -> str | None:
        """Where the weights are read from (an output must never be there); None for a preset."""
        return self.spec if self.kind == "s3" else self.local_path


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def runtime_policy(device: str | None = None, dtype: torch.dtype | str | None = None) -> tuple[str, torch.dtype]:
    """(device, dtype) to run on: CUDA in float16 when available, else CPU in float32.
    Explicit choices win, except the ones that cannot work."""
    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError as e:
        raise DiffmixError(f"invalid device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if device_type == "cuda" and not cuda:
        from ..runtime.nodes import cpu_fallback_warning, cpu_instead_of_missing_cuda, no_cuda_message

        if not cpu_instead_of_missing_cuda():  # e.g. a GPU node whose image lacks the driver: name it
            raise DiffmixError(no_cuda_message())
        cpu_fallback_warning()
        device, device_type = "cpu", "cpu"
        dtype = None if dtype in (torch.float16, "float16", "fp16", "half") else dtype
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise DiffmixError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[dtype.lower()]
    if dtype is None:
        dtype = torch.float16 if device_type == "cuda" else torch.float32
    if device_type == "cpu" and dtype == torch.float16:
        raise DiffmixError("float16 on CPU is refused: many CPU kernels lack half precision and the rest "
                           "are slow; use float32 (the CPU default) or run on a GPU")
    return device, dtype


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def redact(spec: str) -> str:
    """The spec without user:password@ or a query string (presigned URLs carry signatures there)."""
    if "://" not in spec:
        return spec
    parts = urllib.parse.urlsplit(spec)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_preset(spec: str) -> tuple[str, int] | None:
    """('tiny', 7) for 'tiny:7', ('tiny', 0) for 'tiny'; None when `spec` names no preset."""
    name, sep, seed = spec.partition(":")
    if name not in PRESETS or (sep and not seed):
        return None
    if not sep:
        return name, 0
    try:
        return name, int(seed)
    except ValueError:
        raise DiffmixError(f"bad model spec {spec!r}: the seed after ':' must be an integer, "
                           f"e.g. {name}:0") from None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(spec)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


# ---------------------------------------------------------------------------------------------
# Folder checks and fingerprints
# ---------------------------------------------------------------------------------------------
def _is_hidden(rel: str) -> bool:
    # Hidden entries are tool bookkeeping (our staging marker, .cache/huggingface from
    # `huggingface-cli download --local-dir`, .gitattributes), not model content.
    return any(part.startswith(".") for part in rel.split("/"))


def _list_files(folder: str) -> list[str]:
    """Relative POSIX paths of the non-hidden files under `folder`, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):  # hub snapshots are symlink farms
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not _is_hidden(rel):
                found.append(rel)
    return sorted(found)


def _missing_parts(files: Iterable[str]) -> list[str]:
    files = set(files)
    missing = [] if MODEL_INDEX in files else [MODEL_INDEX]
    for component in REQUIRED_COMPONENTS:
        if not any(f.startswith(component + "/") for f in files):
            missing.append(component + "/")
    return missing


def _layout_error(where: str, missing: list[str]) -> DiffmixError:
    return DiffmixError(
        f"{where} is not a complete diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
        f"It needs {MODEL_INDEX} plus the subfolders {', '.join(c + '/' for c in REQUIRED_COMPONENTS)} "
        "(the layout `save_pretrained` and `huggingface-cli download <repo>` produce); copy the missing "
        "parts again, or write a test model with `diffmix-ray model make --preset tiny OUT`")


def validate_model_dir(path: str) -> None:
    """Raise DiffmixError naming every missing piece of the diffusers layout."""
    if not os.path.isdir(path):
        raise DiffmixError(f"model directory {path} does not exist" if not os.path.exists(path) else
                           f"{path} is a file, not a diffusers folder; single-file checkpoints are not "
                           "supported, convert it to a diffusers folder first")
    if missing := _missing_parts(_list_files(path)):
        raise _layout_error(path, missing)


def _file_digest(path: str, whole: bool) -> bytes:
    """sha256 of the whole file, or of its first and last MiB (enough to notice changed weights
    without reading 4 GB on every load)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if whole or size <= 2 * _EDGE_BYTES:
            for chunk in iter(lambda: f.read(_EDGE_BYTES), b""):
                h.update(chunk)
        else:
            h.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return h.digest()


def dir_fingerprint(path: str) -> str:
    """sha256 over sorted relative paths and sizes, whole configs (*.json, *.txt) and the edges of
    every other (weight) file. Hidden files are skipped, so a staged copy matches its source."""
    h = hashlib.sha256()
    for rel in _list_files(path):
        full = os.path.join(path, rel)
        h.update(f"{rel}\0{os.path.getsize(full)}\0".encode("utf-8"))
        h.update(_file_digest(full, whole=rel.endswith((".json", ".txt"))))
    return h.hexdigest()


def _dir_resolution(path: str) -> int:
    """unet sample_size * 2**(len(vae block_out_channels)-1), read from the configs alone."""
    try:
        with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
            sample_size = json.load(f)["sample_size"]
        with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
            vae_blocks = len(json.load(f)["block_out_channels"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise DiffmixError(f"cannot read unet/config.json or vae/config.json in {path} ({e}); "
                           "the model folder is incomplete or corrupt, copy it again") from e
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (vae_blocks - 1)


# ---------------------------------------------------------------------------------------------
# S3 staging
# ---------------------------------------------------------------------------------------------
def model_cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def _download_files(fs, remote: list[str], local: list[str]) -> None:
    """One batched, concurrent copy (fsspec's list form of `get`, which creates parent dirs)."""
    fs.get(remote, local)


def stage_model(uri: str) -> str:
    """Copy the diffusers folder at `uri` (s3://) into the node-local model cache once, and return
    the local path (see stage_folder)."""
    return stage_folder(uri, _missing_parts, _layout_error)


def stage_folder(uri: str, missing_parts: Callable[[Iterable[str]], list[str]],
                 layout_error: Callable[[str, list[str]], DiffmixError]) -> str:
    """Copy the model folder at `uri` (s3://) into the node-local model cache once, and return the
    local path. `missing_parts(relative file names)` says what the folder lacks for its kind of
    model (checked on the listing, before any download) and `layout_error` words the refusal.

    The cache key covers the URI and the remote listing (names, sizes, ETags), so a changed model
    is staged afresh; a file lock makes concurrent processes on a node download once; the copy
    lands under a temp name and is renamed into place, marker file included."""
    uri = storage.normalize(uri)
    if not storage.is_s3(uri):
        raise DiffmixError(f"staging needs an s3:// URI, got {uri!r}; local folders need no staging")
    fs, root = storage.filesystem(uri)
    with storage.explained(uri):
        fs.invalidate_cache(root)  # fsspec instances are shared and cache listings
        listing = fs.find(root, detail=True)
    files: dict[str, dict] = {}
    for name, info in listing.items():
        if info.get("type") != "file" or not name.startswith(root + "/") or name.endswith("/"):
            continue  # skips directory marker objects and sibling prefixes like <root>2/
        rel = name[len(root) + 1:]
        if not _is_hidden(rel):
            files[rel] = info
    if not files:
        raise DiffmixError(f"{uri} holds no files; upload the model folder there "
                           f"(e.g. `aws s3 sync ./model-dir {uri}`) or fix the URI")
    if missing := missing_parts(files):
        raise layout_error(uri, missing)
    if bad := [rel for rel in files if ".." in rel.split("/")]:
        raise DiffmixError(f"{uri} has object keys that would escape the cache folder: {bad[:3]}")

    version = sorted((rel, info.get("size"), str(info.get("ETag") or info.get("LastModified")))
                     for rel, info in files.items())
    key = hashlib.sha256(json.dumps([uri, version]).encode("utf-8")).hexdigest()[:16]
    cache = model_cache_dir()
    final = os.path.join(cache, f"{posixpath.basename(root) or 'model'}-{key}")
    marker = os.path.join(final, STAGED_MARKER)
    if os.path.isfile(marker):
        return final

    from filelock import FileLock

    os.makedirs(cache, exist_ok=True)
    with FileLock(final + ".lock"):
        if os.path.isfile(marker):  # another process finished it while we waited
            return final
        # Holding the lock, any other copy of this key is a leftover of a killed process.
        for leftover in glob.glob(os.path.join(cache, f".staging-{key}-*")) + [final]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".staging-{key}-", dir=cache)  # same filesystem: rename is atomic
        try:
            rels = sorted(files)
            with storage.explained(uri):
                _download_files(fs, [f"{root}/{rel}" for rel in rels], [os.path.join(tmp, rel) for rel in rels])
            for rel in rels:
                if os.path.getsize(os.path.join(tmp, rel)) != files[rel].get("size"):
                    raise DiffmixError(f"staging {uri}: {rel} arrived truncated; retry (the object may "
                                       "have been overwritten during the copy)")
            with open(os.path.join(tmp, STAGED_MARKER), "w", encoding="utf-8") as f:
                sizes = {rel: files[rel].get("size") for rel in rels}
                json.dump({"uri": uri, "staged_at": time.time(), "files": sizes}, f)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------------------------------------
# Resolution and loading
# ---------------------------------------------------------------------------------------------
def _hub_download(repo_id: str) -> str:
    """The hub snapshot folder for `repo_id`, holding only what an SD pipeline loads."""
    if _hub_offline():
        raise DiffmixError(
            f"model {repo_id!r} is not a preset ({', '.join(sorted(PRESETS))}), a local directory or "
            "s3:// URI; HF_HUB_OFFLINE=1 forbids hub downloads: download it once "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and pass the directory")
    from diffusers import StableDiffusionPipeline

    try:  # the hub is reached only here, and only because the user named a hub id
        return StableDiffusionPipeline.download(repo_id, safety_checker=None, feature_extractor=None)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable message
        raise DiffmixError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"{e}); check the repo id, the network, and HF_TOKEN for gated models, or "
                           "pass a local diffusers directory") from e


def resolve_model(spec: str) -> ModelRef:
    """Find (staging or downloading as needed) the model `spec` names, without loading weights."""
    clean = redact(spec)
    if preset := parse_preset(spec):
        config = preset_config(preset[0])
        return ModelRef(clean, "preset", None, config.fingerprint(preset[1]), config.resolution)
    if spec == sample_models.SAMPLE_SPEC:  # the trained sample model shipped in the package
        path = sample_models.shipped("sd")
        validate_model_dir(path)
        return ModelRef(clean, "sample", path, dir_fingerprint(path), _dir_resolution(path))
    if storage.is_s3(spec):
        kind, path = "s3", stage_model(spec)
    elif _looks_like_path(spec):
        kind, path = "dir", storage.normalize(spec)
    elif _HUB_ID.match(spec):
        kind, path = "hub", _hub_download(spec)
    else:
        raise DiffmixError(f"model {clean!r} is not a preset ({', '.join(sorted(PRESETS))}), `sample`, an existing "
                           "local directory, an s3:// URI or a hub id like org/name; fix the spec")
    validate_model_dir(path)
    sample_models.verify(path)  # a folder `model train-sample` wrote: refused if a file changed since
    return ModelRef(clean, kind, path, dir_fingerprint(path), _dir_resolution(path))


def model_fingerprint(path_or_preset: str) -> str:
    """The fingerprint a ModelRef for this spec would carry (stages/downloads like load_pipeline)."""
    return resolve_model(path_or_preset).fingerprint


def _pipeline_class(pipeline: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    classes = {"img2img": StableDiffusionImg2ImgPipeline, "text2img": StableDiffusionPipeline}
    if pipeline not in classes:
        raise DiffmixError(f"unknown pipeline kind {pipeline!r}; use one of {list(PIPELINE_KINDS)}")
    return classes[pipeline]


def _sharing(pipeline_class, components: dict):
    """A pipeline of `pipeline_class` around existing modules (no weights copied), quiet, no safety checker."""
    shell = pipeline_class(**components, requires_safety_checker=False)
    shell.set_progress_bar_config(disable=True)
    return shell


def to_text2img(pipe):
    """A StableDiffusionPipeline sharing `pipe`'s modules. Not `from_pipe`: that casts the shared
    modules to float32 unless told otherwise."""
    from diffusers import StableDiffusionPipeline

    return _sharing(StableDiffusionPipeline, pipe.components)


def with_own_scheduler(pipe):
    """A pipeline of `pipe`'s class sharing its modules but with a scheduler of its own: a pipeline
    call keeps its denoising state (timesteps, step index) on its scheduler, so threads that run
    calls at once each need one."""
    import copy

    return _sharing(type(pipe), dict(pipe.components, scheduler=copy.deepcopy(pipe.scheduler)))


def load_pipeline(spec: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                  pipeline: str = "img2img"):
    """(pipeline, ModelRef) for `spec` on `device` in `dtype` (defaults: runtime_policy).
    `pipeline` is "img2img" (StableDiffusionImg2ImgPipeline) or "text2img" (StableDiffusionPipeline).
    The safety checker is always off and progress bars are silent."""
    device, dtype = runtime_policy(device, dtype)
    pipeline_class = _pipeline_class(pipeline)
    ref = resolve_model(spec)
    if ref.kind == "preset":
        pipe = build_pipeline(*parse_preset(spec))
        if pipeline == "text2img":
            pipe = to_text2img(pipe)
    else:
        try:
            pipe = pipeline_class.from_pretrained(
                ref.local_path, dtype=dtype, local_files_only=True,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign folder gets one clear message
            raise DiffmixError(f"cannot load {ref.local_path} (from {ref.spec}) as a Stable Diffusion "
                               f"pipeline: {type(e).__name__}: {e}") from e
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # nn.Module.to, not DiffusionPipeline.to: diffusers 0.42's ModelMixin.to logs "should be
            # kept in float32: [] ... inconsistent results" on every dtype cast, even to the dtype the
            # weights already have, so each actor's start-up printed two false alarms.
            torch.nn.Module.to(module, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ref


def write_model(spec: str, out: str, overwrite: bool = False, dtype: str | None = None) -> str:
    """Write the model `spec` names as a diffusers folder at `out` (local path or s3://).
    Refuses a non-empty `out` unless `overwrite`. `dtype` (float32 | float16) applies to presets
    only (default: the preset's own, float16 for sd15); a folder is copied byte for byte.
    Returns the normalized `out`."""
    out = storage.normalize(out)
    if storage.list_dir(out) and not overwrite:
        raise DiffmixError(f"refusing to write a model into {out}: it is not empty; "
                           "choose another path or pass overwrite")
    preset = parse_preset(spec)
    if preset:
        dtype = resolve_write_dtype(preset[0], dtype)
    elif dtype is not None:  # checked before resolving: that may stage or download the model
        raise DiffmixError(f"dtype {dtype!r} applies only to built-in presets ({', '.join(sorted(PRESETS))}); "
                           f"{redact(spec)} is copied as it is: drop the dtype, or convert the folder yourself")
    ref = resolve_model(spec)
    storage.check_out_of_inputs(out, {"the model": ref.location})  # --overwrite would delete the source
    if preset and not storage.is_s3(out):
        # Straight into `out`: no temporary copy of a multi-GB model. write_preset saves
        # model_index.json last, so an interrupted write is refused as incomplete on load.
        if overwrite:
            storage.remove_tree(out)
        return write_preset(preset[0], out, seed=preset[1], dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="diffmix-model-") as tmp:
        if preset:
            source = write_preset(preset[0], tmp, seed=preset[1], dtype=dtype)
        else:
            source = ref.local_path
        rels = _list_files(source)
        if overwrite:
            storage.remove_tree(out)
        if storage.is_s3(out):
            fs, root = storage.filesystem(out)
            with storage.explained(out):
                fs.put([os.path.join(source, r) for r in rels], [f"{root}/{r}" for r in rels])
        else:
            for rel in rels:
                os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
                shutil.copy2(os.path.join(source, rel), os.path.join(out, rel))
    return out
