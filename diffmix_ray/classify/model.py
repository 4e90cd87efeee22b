"""timm classifiers by name, with local pretrained weights and a new head for C classes."""

from __future__ import annotations

import os

from ..errors import DiffmixError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise DiffmixError(f"--arch {arch!r} is not a timm architecture" +
                           (f"; similar: {', '.join(close)}" if close else "") + " (see timm.list_models())")


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise DiffmixError(f"--pretrained {path} holds none of {WEIGHT_FILES}")
    if not os.path.exists(path):
        raise DiffmixError(f"--pretrained {path} does not exist (weights are read from local files only)")
    return path


def build_model(arch: str, num_classes: int, pretrained: str | None = None):
    """`arch` with `num_classes` outputs; `pretrained` weights (a local file or folder) are loaded
    through timm's own loader, which drops the old classifier head when the class count differs."""
    import timm

    check_arch(arch)
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    file = _weights_file(pretrained)
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay={"file": file, "hf_hub_id": None, "url": None})
    except (RuntimeError, KeyError, ValueError) as e:
        raise DiffmixError(f"--pretrained {pretrained} does not fit --arch {arch}: {str(e).splitlines()[0][:300]}; "
                           "pass weights saved from the same architecture") from e


def data_config(arch: str, img_size: int | None) -> dict:
    """Input size, normalisation and crop of the architecture (timm's pretrained config)."""
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    cfg = resolve_data_config({}, model=model)
    return {"img_size": int(img_size or cfg["input_size"][-1]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "interpolation": cfg["interpolation"], "crop_pct": float(cfg["crop_pct"])}
