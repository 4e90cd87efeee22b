"""CLIP models for `score`: a spec -> (CLIPModel, tokenizer, image preprocessing), the same way on
a laptop and a cluster. A spec is one of:

  * a preset, optionally with a weight seed (`tiny:7`), built in memory from config, offline
    (clip_presets.py): `tiny` for tests and the demo, `clip-b32` (CLIP ViT-B/32's architecture)
    for GPU benchmarks;
  * `sample`: the small CLIP trained on the sample world, shipped in the package (a CLIPModel
    folder checked against its training record; see sample.py);
  * a local folder in transformers' CLIPModel layout: config.json (model_type "clip"), the weights,
    tokenizer files and preprocessor_config.json (what `save_pretrained` of CLIPModel and
    CLIPProcessor write, and what `huggingface-cli download openai/clip-vit-base-patch32` fetches);
  * `s3://bucket/prefix` holding such a folder: staged once per node (spec.stage_folder);
  * `org/name`: a Hugging Face hub id, downloaded only because the user named it, and refused
    under HF_HUB_OFFLINE=1.

Folders are always opened with local_files_only=True. The image preprocessing is returned as
plain numbers (ImagePrep) so that the CPU stage before the scoring actor can apply it without
importing torch or transformers. This module declares the CLIP kind of model folder (CLIP: its
layout, presets and messages); spec.py resolves specs the same way for every kind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch

from .. import storage
from ..errors import DiffmixError
from . import sample as sample_models
from . import spec as specs
from .clip_presets import CLIP_PRESETS, ClipPreset, build_clip
from .loader import runtime_policy

CONFIG_JSON = "config.json"
PREPROCESSOR_JSON = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what CLIP was trained with (transformers' OPENAI_CLIP_*)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC, as CLIP's processor resizes
# What a hub download of a CLIP repo needs (not the TF/Flax/ONNX copies some repos also hold).
HUB_PATTERNS = [CONFIG_JSON, PREPROCESSOR_JSON, "*.safetensors", "model.safetensors.index.json", "tokenizer*",
                "vocab.json", "merges.txt", "special_tokens_map.json"]
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name; a bare word is an unknown spec


@dataclass(frozen=True)
class ImagePrep:
    """CLIP's image processor as numbers: resize (the shorter side to `shortest_edge`, keeping the
    aspect, or to exactly `size`), centre-crop to `crop`, then (x * rescale - mean) / std."""

    shortest_edge: int | None
    size: tuple[int, int] | None  # (height, width)
    crop: tuple[int, int] | None  # (height, width)
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        raise DiffmixError("a CLIP processor that resizes by shortest edge without a centre crop gives images of "
                           "varying shapes, which cannot be batched; set do_center_crop in preprocessor_config.json")


@dataclass(frozen=True)
class ClipRef(specs.SpecRef):
    prep: ImagePrep


def parse_clip_preset(spec: str) -> tuple[str, int] | None:
    """('tiny', 7) for 'tiny:7', ('tiny', 0) for 'tiny'; None when `spec` names no CLIP preset."""
    return specs.parse_preset(CLIP, spec)


def _preset_prep(p: ClipPreset) -> ImagePrep:
    return ImagePrep(p.image_size, None, (p.image_size, p.image_size), BICUBIC, OPENAI_MEAN, OPENAI_STD)


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------
def _missing_parts(files) -> list[str]:
    files = set(files)
    missing = [f for f in (CONFIG_JSON, PREPROCESSOR_JSON) if f not in files]
    if not files & set(WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def _read_json(path: str, name: str) -> dict:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DiffmixError(f"cannot read {name} in {path} ({e}); the CLIP folder is corrupt, copy it again") from e


def _pair(value, what: str, path: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise DiffmixError(f"{path}/{PREPROCESSOR_JSON}: unsupported {what} {value!r} (expected N or height/width)")


def _folder_prep(path: str) -> ImagePrep:
    cfg = _read_json(path, PREPROCESSOR_JSON)
    size = cfg.get("size", {"shortest_edge": 224}) if cfg.get("do_resize", True) else None
    shortest = None
    if isinstance(size, int) or (isinstance(size, dict) and "shortest_edge" in size):
        shortest, size = int(size if isinstance(size, int) else size["shortest_edge"]), None
    crop = _pair(cfg.get("crop_size", 224), "crop_size", path) if cfg.get("do_center_crop", True) else None
    normalize = cfg.get("do_normalize", True)
    prep = ImagePrep(shortest, _pair(size, "size", path), crop, int(cfg.get("resample", BICUBIC)),
                     tuple(cfg.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
                     tuple(cfg.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
                     float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0)
    prep.output_hw  # noqa: B018 - refuses an unbatchable processor now, not in an actor
    return prep


def validate_clip_dir(path: str) -> None:
    """Raise DiffmixError naming what keeps `path` from being a CLIP model folder."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        raise DiffmixError(f"{path} is a diffusers pipeline folder (model_index.json), not a CLIP model; pass a "
                           "CLIPModel folder to --clip (a Stable Diffusion checkpoint's text encoder has no image "
                           "tower)")
    specs.check_folder(CLIP, path, f"CLIP model folder {path} does not exist",
                       f"{path} is a file, not a CLIP model folder")
    model_type = _read_json(path, CONFIG_JSON).get("model_type")
    if model_type != "clip":
        raise DiffmixError(f"{path}/{CONFIG_JSON} has model_type {model_type!r}, not 'clip': --clip needs a CLIPModel "
                           "checkpoint (text and image towers), e.g. openai/clip-vit-base-patch32")


def _hub_fetch(repo_id: str) -> str:
    import huggingface_hub

    return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)


CLIP = specs.ModelKind(
    presets=CLIP_PRESETS,
    preset_fingerprint=lambda name, seed: CLIP_PRESETS[name].fingerprint(seed),
    spec_words="--clip spec",
    missing_parts=_missing_parts,
    folder_name="CLIP model folder",
    layout_help=(f"It needs transformers' CLIPModel layout: {CONFIG_JSON} (model_type \"clip\"), model.safetensors, "
                 f"tokenizer files and {PREPROCESSOR_JSON} (what CLIPModel and CLIPProcessor save_pretrained write, or "
                 "`huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`); for a test model: "
                 "`diffmix-ray model make-clip OUT`"),
    validate=validate_clip_dir,
    hub_id=_HUB_REPO,
    hub_fetch=_hub_fetch,
    offline_error=lambda repo_id: (
        f"--clip {repo_id!r} is a hub id and HF_HUB_OFFLINE=1 forbids hub downloads: download it once "
        f"(huggingface-cli download {repo_id} --local-dir DIR) and pass the folder"),
    hub_error=lambda repo_id, e: (
        f"could not download CLIP {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); check the "
        "repo id, the network and HF_TOKEN, or pass a local folder"),
    shipped={sample_models.SAMPLE_SPEC: lambda: sample_models.shipped("clip")},  # trained on the sample world
    unknown_error=lambda clean: (
        f"unknown --clip spec {clean!r}: use a preset ({', '.join(CLIP_PRESETS)}, optionally with :SEED), "
        "`sample` (trained on the sample world), a CLIPModel folder, an s3:// URI of one, or a hub id like openai/clip-vit-base-patch32"),
)


def resolve_clip(spec: str) -> ClipRef:
    """Find (staging or downloading as needed) the CLIP model `spec` names, without loading it."""
    r = specs.resolve(CLIP, spec)
    prep = _preset_prep(CLIP_PRESETS[r.preset[0]]) if r.preset else _folder_prep(r.local_path)
    return ClipRef(r.spec, r.kind, r.local_path, r.fingerprint, prep)


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file bars: noise in job logs, nothing to watch for seconds-long loads


def load_clip(spec: str, device: str | None = None, dtype: torch.dtype | str | None = None):
    """(CLIPModel in eval mode on `device` in `dtype`, tokenizer, ClipRef); defaults: runtime_policy."""
    device, dtype = runtime_policy(device, dtype)
    _quiet()
    ref = resolve_clip(spec)
    if ref.kind == "preset":
        model, tokenizer = build_clip(*parse_clip_preset(spec))
    else:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(ref.local_path, local_files_only=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(ref.local_path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt folder gets one clear message
            raise DiffmixError(f"cannot load {ref.local_path} (from {ref.spec}) as a CLIP model: "
                               f"{type(e).__name__}: {e}") from e
    return model.to(device=device, dtype=dtype).eval(), tokenizer, ref


def write_clip(spec: str, out: str, overwrite: bool = False) -> str:
    """Write the CLIP model `spec` names as a CLIPModel folder at `out` (local or s3://): a preset's
    weights in float32, a folder copied as it is. The files land under a temporary name first, so
    an interrupted write leaves nothing that looks like a model."""
    from transformers import CLIPImageProcessor

    _quiet()
    out = specs.refuse_non_empty(out, "a CLIP model", overwrite, "pass --overwrite")
    ref = resolve_clip(spec)
    storage.check_out_of_inputs(out, {"the CLIP model": ref.location})  # --overwrite would delete the source
    with tempfile.TemporaryDirectory(prefix="diffmix-clip-") as tmp:
        if ref.kind == "preset":
            model, tokenizer = build_clip(*parse_clip_preset(spec))
            source = os.path.join(tmp, "clip")
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
            p = ref.prep
            CLIPImageProcessor(size={"shortest_edge": p.shortest_edge}, resample=p.resample,
                               crop_size={"height": p.crop[0], "width": p.crop[1]}, image_mean=list(p.mean),
                               image_std=list(p.std)).save_pretrained(source)
        else:
            source = ref.local_path
        return specs.copy_folder(source, out)
