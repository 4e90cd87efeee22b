"""timm classifiers by name, with local pretrained weights and a new head for C classes."""

from __future__ import annotations

import os

from ..errors import DiffmixError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# --pretrained none: random initialisation on purpose (a recipe naming pretrained weights insists on
# being told), recorded as such in metrics.json and the report
FROM_SCRATCH = "none"


def check_arch(arch: str) -> None:
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


def fingerprint(file: str) -> str:
    """sha256 of a weights file's bytes: which weights a run started from, whatever the file is called."""
    import hashlib

    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_weights(pretrained: str | None) -> dict:
    """What a run's backbone started from, for metrics.json and the report: the file and its sha256,
    or a random initialisation (chosen with --pretrained none, or no --pretrained at all)."""
    if not pretrained or pretrained == FROM_SCRATCH:
        return {"pretrained": pretrained, "file": None, "sha256": None,
                "init": "random (--pretrained none)" if pretrained == FROM_SCRATCH else "random (no --pretrained)"}
    file = weights_file(pretrained)
    return {"pretrained": pretrained, "file": file, "sha256": fingerprint(file), "init": "pretrained"}


def build_model(arch: str, num_classes: int, pretrained: str | None = None):
    """`arch` with `num_classes` outputs. `pretrained` weights (a local file or folder; None or "none":
    random initialisation) must fit the architecture exactly, except the classifier head, which is
    replaced when the class count differs: a file for another architecture is refused instead of
    half-loaded."""
    import timm

    check_arch(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if not pretrained or pretrained == FROM_SCRATCH:
        return model
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
    return model

