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
  * `s3://bucket/prefix` holding such a folder: staged once per node (loader.stage_folder);
  * `org/name`: a Hugging Face hub id, downloaded only because the user named it, and refused
    under HF_HUB_OFFLINE=1.

Folders are always opened with local_files_only=True. The image preprocessing is returned as
plain numbers (ImagePrep) so that the CPU stage before the scoring actor can apply it without
importing torch or transformers."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .. import storage
from ..errors import DiffmixError
from . import sample as sample_models
from .loader import _hub_offline, _list_files, _looks_like_path, dir_fingerprint, redact, runtime_policy, stage_folder
from .clip_presets import CLIP_PRESETS, ClipPreset, build_clip

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
class ClipRef:
    spec: str  # as given, minus any credentials
    kind: str  # "preset" | "sample" | "dir" | "s3" | "hub"
    local_path: str | None  # None for presets
    fingerprint: str
    prep: ImagePrep

    @property
    def location(self) -> str | None:
        """Where the weights are read from (an output must never be there); None for a preset."""
        return self.spec if self.kind == "s3" else self.local_path


def parse_clip_preset(spec: str) -> tuple[str, int] | None:
    name, sep, seed = spec.partition(":")
    if name not in CLIP_PRESETS or (sep and not seed):
        return None
    try:
        return name, int(seed) if sep else 0
    except ValueError:
        raise DiffmixError(f"bad --clip spec {spec!r}: the seed after ':' must be an integer, e.g. {name}:0") from None


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


def _layout_error(where: str, missing: list[str]) -> DiffmixError:
    return DiffmixError(
        f"{where} is not a CLIP model folder: missing {', '.join(missing)}. It needs transformers' CLIPModel "
        f"layout: {CONFIG_JSON} (model_type \"clip\"), model.safetensors, tokenizer files and {PREPROCESSOR_JSON} "
        "(what CLIPModel and CLIPProcessor save_pretrained write, or `huggingface-cli download "
        "openai/clip-vit-base-patch32 --local-dir DIR`); for a test model: `diffmix-ray model make-clip OUT`")


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
    if not os.path.isdir(path):
        raise DiffmixError(f"CLIP model folder {path} does not exist" if not os.path.exists(path) else
                           f"{path} is a file, not a CLIP model folder")
    files = _list_files(path)
    if "model_index.json" in files:
        raise DiffmixError(f"{path} is a diffusers pipeline folder (model_index.json), not a CLIP model; pass a "
                           "CLIPModel folder to --clip (a Stable Diffusion checkpoint's text encoder has no image "
                           "tower)")
    if missing := _missing_parts(files):
        raise _layout_error(path, missing)
    model_type = _read_json(path, CONFIG_JSON).get("model_type")
    if model_type != "clip":
        raise DiffmixError(f"{path}/{CONFIG_JSON} has model_type {model_type!r}, not 'clip': --clip needs a CLIPModel "
                           "checkpoint (text and image towers), e.g. openai/clip-vit-base-patch32")


def _hub_download(repo_id: str) -> str:
    if _hub_offline():
        raise DiffmixError(f"--clip {repo_id!r} is a hub id and HF_HUB_OFFLINE=1 forbids hub downloads: download it "
                           f"once (huggingface-cli download {repo_id} --local-dir DIR) and pass the folder")
    import huggingface_hub

    try:  # the hub is reached only here, and only because the user named a hub id
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable message
        raise DiffmixError(f"could not download CLIP {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                           "check the repo id, the network and HF_TOKEN, or pass a local folder") from e


def resolve_clip(spec: str) -> ClipRef:
    """Find (staging or downloading as needed) the CLIP model `spec` names, without loading it."""
    clean = redact(spec)
    if preset := parse_clip_preset(spec):
        p = CLIP_PRESETS[preset[0]]
        return ClipRef(clean, "preset", None, p.fingerprint(preset[1]), _preset_prep(p))
    if spec == sample_models.SAMPLE_SPEC:  # the CLIP trained on the sample world, shipped in the package
        path = sample_models.shipped("clip")
        validate_clip_dir(path)
        return ClipRef(clean, "sample", path, dir_fingerprint(path), _folder_prep(path))
    if storage.is_s3(spec):
        kind, path = "s3", stage_folder(spec, _missing_parts, _layout_error)
    elif _looks_like_path(spec):
        kind, path = "dir", storage.normalize(spec)
    elif _HUB_REPO.match(spec):
        kind, path = "hub", _hub_download(spec)
    else:
        raise DiffmixError(f"unknown --clip spec {clean!r}: use a preset ({', '.join(CLIP_PRESETS)}, optionally "
                           "with :SEED), `sample` (trained on the sample world), a CLIPModel folder, an s3:// URI of one, or a hub id like "
                           "openai/clip-vit-base-patch32")
    validate_clip_dir(path)
    sample_models.verify(path)  # a folder `model train-sample` wrote: refused if a file changed since
    return ClipRef(clean, kind, path, dir_fingerprint(path), _folder_prep(path))


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
    out = storage.normalize(out)
    if storage.list_dir(out) and not overwrite:
        raise DiffmixError(f"refusing to write a CLIP model into {out}: it is not empty; choose another path "
                           "or pass --overwrite")
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
        rels = _list_files(source)
        storage.remove_tree(out)
        if storage.is_s3(out):
            fs, root = storage.filesystem(out)
            with storage.explained(out):
                fs.put([os.path.join(source, r) for r in rels], [f"{root}/{r}" for r in rels])
        else:
            staging = f"{out}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            for rel in rels:
                os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
                shutil.copy2(os.path.join(source, rel), os.path.join(staging, rel))
            os.rename(staging, out)
    return out
