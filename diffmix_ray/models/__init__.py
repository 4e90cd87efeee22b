"""The model kit: offline SD-shaped presets, and one loader for presets, folders, s3:// and hub ids."""

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
    "PRESETS", "ModelRef", "PresetConfig", "build_pipeline", "build_tokenizer", "dir_fingerprint",
    "load_pipeline", "model_cache_dir", "model_fingerprint", "preset_modules", "preset_tokenizer",
    "resolve_model", "runtime_policy", "stage_model", "to_text2img", "validate_model_dir", "write_model",
    "write_preset",
]
