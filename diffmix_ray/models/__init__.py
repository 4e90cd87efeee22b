"""The model kit: offline SD-shaped presets; one spec resolver (spec.py) for presets, shipped folders, folders,
s3:// and hub ids, that the SD loader and CLIP declare their kind to; one timm classifier factory.

The names below load their module on first use (PEP 562), so importing one light module of the kit
(`models.classifier` in a train-cls worker, `models.spec` on a driver) does not import diffusers and
transformers with it: seconds per Ray Train worker start on a small machine."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_classifier": "classifier",
    **{name: "loader" for name in ("ModelRef", "dir_fingerprint", "load_pipeline", "model_cache_dir",
                                   "model_fingerprint", "resolve_model", "runtime_policy", "stage_model",
                                   "to_text2img", "validate_model_dir", "write_model")},
    **{name: "presets" for name in ("PRESETS", "PresetConfig", "build_pipeline", "build_tokenizer", "preset_modules",
                                    "preset_tokenizer", "write_preset")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
