"""timm classifiers by name: the one place a classifier is built, for training (classify), evaluation,
scoring with a trained classifier (score) and the image pipeline's data config. timm's registry and
`create_model` are the factory; this adds the checks and the weight loading the stages share.

Weights are read from local files only (`pretrained=False` always: nothing is downloaded)."""

from __future__ import annotations

import os
from typing import Mapping

from ..errors import DiffmixError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def check_arch(arch: str) -> None:
    """Refuse a name timm does not know, suggesting the close ones."""
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise DiffmixError(f"--arch {arch!r} is not a timm architecture" +
                           (f"; similar: {', '.join(close)}" if close else "") + " (see timm.list_models())")


def weights_file(path: str, flag: str = "--pretrained") -> str:
    """The weights file `path` names: the file itself, or the first of WEIGHT_FILES in a folder."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise DiffmixError(f"{flag} {path} holds none of {WEIGHT_FILES}")
    if not os.path.exists(path):
        raise DiffmixError(f"{flag} {path} does not exist (weights are read from local files only)")
    return path


def read_state(file: str) -> dict:
    """A state dict from a .safetensors or torch file, unwrapped from the usual checkpoint wrappers."""
    import torch

    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers of saved checkpoints
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_classifier(arch: str, num_classes: int, weights: str | Mapping | None = None, **timm_kwargs):
    """timm `arch` with `num_classes` outputs, on the CPU, in train mode (timm's default).

    `weights`:
      * None: random initialisation;
      * a local file or folder (WEIGHT_FILES) of pretrained weights: they must fit the architecture
        exactly, except the classifier head, which is replaced when the class count differs; a file
        for another architecture is refused instead of half-loaded;
      * a state dict of this very classifier (a trained run's weights): loaded strictly.
    `timm_kwargs` go to timm.create_model (e.g. depth=2 for a shallow test model)."""
    import timm

    check_arch(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if weights is None:
        return model
    if isinstance(weights, Mapping):
        model.load_state_dict(weights)
        return model
    _load_pretrained(model, arch, weights)
    return model


def _load_pretrained(model, arch: str, pretrained: str) -> None:
    file = weights_file(pretrained)
    try:
        state = read_state(file)
    except Exception as e:  # noqa: BLE001 - unreadable file in any format
        raise DiffmixError(f"--pretrained {pretrained} is not a readable weights file: {e}") from e
    head = model.pretrained_cfg.get("classifier", "")
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (head and k.startswith(head + ".") and (k not in own or own[k].shape != v.shape))}
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in bad_shapes}, strict=False)
    missing = [k for k in result.missing_keys if not (head and k.startswith(head + "."))]
    problems = missing + list(result.unexpected_keys) + bad_shapes
    if problems:
        raise DiffmixError(f"--pretrained {pretrained} does not fit --arch {arch}: {len(missing)} missing, "
                           f"{len(result.unexpected_keys)} unexpected and {len(bad_shapes)} mis-shaped tensors "
                           f"(e.g. {problems[:3]}); pass weights saved from the same architecture")
