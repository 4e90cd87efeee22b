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
a model never talks to the hub behind the user's back. This module declares the SD kind of model folder
(SD: its layout, presets and messages); spec.py resolves specs the same way for every kind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable

import torch

from .. import storage
from ..errors import DiffmixError
from . import sample as sample_models
from . import spec as specs
from .presets import PRESETS, build_pipeline, preset_config, resolve_write_dtype, write_preset
from .spec import CACHE_ENV, STAGED_MARKER, SpecRef, dir_fingerprint, model_cache_dir, redact  # noqa: F401 - API

MODEL_INDEX = "model_index.json"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_KINDS = ("img2img", "text2img")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef(SpecRef):
    """Where a pipeline came from, for manifests and cache keys. Holds no secrets."""

    resolution: int  # native image side in pixels: unet sample_size * VAE scale factor


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
# The Stable Diffusion kind of model folder
# ---------------------------------------------------------------------------------------------
def _missing_parts(files: Iterable[str]) -> list[str]:
    files = set(files)
    missing = [] if MODEL_INDEX in files else [MODEL_INDEX]
    for component in REQUIRED_COMPONENTS:
        if not any(f.startswith(component + "/") for f in files):
            missing.append(component + "/")
    return missing


def validate_model_dir(path: str) -> None:
    """Raise DiffmixError naming every missing piece of the diffusers layout."""
    specs.check_folder(SD, path, f"model directory {path} does not exist",
                       f"{path} is a file, not a diffusers folder; single-file checkpoints are not supported, "
                       "convert it to a diffusers folder first")


def _hub_fetch(repo_id: str) -> str:
    """The hub snapshot folder for `repo_id`, holding only what an SD pipeline loads."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.download(repo_id, safety_checker=None, feature_extractor=None)


SD = specs.ModelKind(
    presets=PRESETS,
    preset_fingerprint=lambda name, seed: preset_config(name).fingerprint(seed),
    spec_words="model spec",
    missing_parts=_missing_parts,
    folder_name="complete diffusers Stable Diffusion folder",
    layout_help=(f"It needs {MODEL_INDEX} plus the subfolders {', '.join(c + '/' for c in REQUIRED_COMPONENTS)} "
                 "(the layout `save_pretrained` and `huggingface-cli download <repo>` produce); copy the missing "
                 "parts again, or write a test model with `diffmix-ray model make --preset tiny OUT`"),
    validate=validate_model_dir,
    hub_id=_HUB_ID,
    hub_fetch=_hub_fetch,
    offline_error=lambda repo_id: (
        f"model {repo_id!r} is not a preset ({', '.join(sorted(PRESETS))}), a local directory or "
        "s3:// URI; HF_HUB_OFFLINE=1 forbids hub downloads: download it once "
        f"(huggingface-cli download {repo_id} --local-dir DIR) and pass the directory"),
    hub_error=lambda repo_id, e: (
        f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); check the "
        "repo id, the network, and HF_TOKEN for gated models, or pass a local diffusers directory"),
    shipped={sample_models.SAMPLE_SPEC: lambda: sample_models.shipped("sd")},  # trained on the sample world
    unknown_error=lambda clean: (
        f"model {clean!r} is not a preset ({', '.join(sorted(PRESETS))}), `sample`, an existing local directory, "
        "an s3:// URI or a hub id like org/name; fix the spec"),
)


def parse_preset(spec: str) -> tuple[str, int] | None:
    """('tiny', 7) for 'tiny:7', ('tiny', 0) for 'tiny'; None when `spec` names no preset."""
    return specs.parse_preset(SD, spec)


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


def stage_model(uri: str) -> str:
    """Copy the diffusers folder at `uri` (s3://) into the node-local model cache once, and return
    the local path (see spec.stage_folder)."""
    return specs.stage_folder(uri, SD)


# ---------------------------------------------------------------------------------------------
# Resolution and loading
# ---------------------------------------------------------------------------------------------
def resolve_model(spec: str) -> ModelRef:
    """Find (staging or downloading as needed) the model `spec` names, without loading weights."""
    r = specs.resolve(SD, spec)
    resolution = preset_config(r.preset[0]).resolution if r.preset else _dir_resolution(r.local_path)
    return ModelRef(r.spec, r.kind, r.local_path, r.fingerprint, resolution)


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
    out = specs.refuse_non_empty(out, "a model", overwrite, "pass overwrite")
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
    if not preset:
        return specs.copy_folder(ref.local_path, out)
    with tempfile.TemporaryDirectory(prefix="diffmix-model-") as tmp:
        return specs.copy_folder(write_preset(preset[0], tmp, seed=preset[1], dtype=dtype), out)
