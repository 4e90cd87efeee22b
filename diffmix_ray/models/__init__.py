"""The model kit: offline SD-shaped presets; one spec resolver (spec.py) for presets, shipped folders, folders,
s3:// and hub ids, that the SD loader and CLIP declare their kind to; one timm classifier factory."""

from .classifier import create_classifier
from .loader import (
    ModelRef,
    dir_fingerprint,
    load_pipeline,
    model_cache_dir,
    model_fingerprint,
    resolve_model,
    runtime_policy,
    stage_model,
    to_text2img,
    validate_model_dir,
    write_model,
)
from .presets import (
    PRESETS,
    PresetConfig,
    build_pipeline,
    build_tokenizer,
    preset_modules,
    preset_tokenizer,
    write_preset,
)

__all__ = [
    "PRESETS", "ModelRef", "PresetConfig", "build_pipeline", "build_tokenizer", "create_classifier", "dir_fingerprint",
    "load_pipeline", "model_cache_dir", "model_fingerprint", "preset_modules", "preset_tokenizer",
    "resolve_model", "runtime_policy", "stage_model", "to_text2img", "validate_model_dir", "write_model",
    "write_preset",
]
