"""The classifier's image pipelines, defined here once for training, per-epoch evaluation and
`evaluate`. A pipeline is the augmentation steps (PIL image in, PIL image out: geometry and colour)
followed by one final step that turns pixels into the model's input (ToTensor + normalisation).
That step is kept separate and last so that it can move onto the GPU (uint8 out of the data
workers) by changing `to_input` and its caller only.

- `timm`: the architecture's own timm pipeline (RandomResizedCrop 0.08-1 + flip + ColorJitter 0.4;
  eval Resize(size / crop_pct) + CenterCrop) with the architecture's normalisation.
- `reference`: the Diff-Mix code's conventional/few-shot trainer: Resize((r, r)) -> RandomCrop(c,
  padding=8) -> HFlip; eval Resize((r, r)) -> CenterCrop(c); ImageNet normalisation.
- `reference-lt`: the Diff-Mix code's long-tail trainer: RandomResizedCrop(c) -> HFlip ->
  ColorJitter(0.4, 0.4, 0.4); eval Resize(r) (shorter side) -> CenterCrop(c); ImageNet normalisation.
(r, c) comes from `--res-mode`: 224 -> (256, 224), 384 -> (440, 384), 448 -> (512, 448)."""

from __future__ import annotations

import functools
import json

from ..errors import DiffmixError

AUGMENTS = ("timm", "reference", "reference-lt")
RES_MODES = {224: (256, 224), 384: (440, 384), 448: (512, 448)}
DEFAULT_RES_MODE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm ends its pipelines with these; `to_input` replaces them so every pipeline ends the same way.
_TIMM_TENSOR_STEPS = ("MaybeToTensor", "MaybePILToTensor", "ToTensor", "PILToTensor", "Normalize")


def data_config(arch: str, augment: str, img_size: int | None, res_mode: int | None) -> dict:
    """Everything the pipelines need, as plain JSON (it is stored with the weights in best/model.json)."""
    if augment == "timm":
        import timm
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=timm.create_model(arch, pretrained=False, num_classes=2))
        return {"augment": "timm", "img_size": int(img_size or cfg["input_size"][-1]), "mean": list(cfg["mean"]),
                "std": list(cfg["std"]), "interpolation": cfg["interpolation"], "crop_pct": float(cfg["crop_pct"])}
    if augment not in AUGMENTS:
        raise DiffmixError(f"--augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    mode = res_mode or DEFAULT_RES_MODE
    resize, crop = RES_MODES[mode]
    return {"augment": augment, "res_mode": mode, "resize": resize, "img_size": crop,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def augmentations(d: dict, training: bool) -> list:
    """The PIL -> PIL steps of the pipeline `d` describes."""
    from torchvision import transforms as T

    # best/model.json files written before --augment existed describe timm's pipeline
    augment = d.get("augment", "timm")
    size = d["img_size"]
    if augment == "timm":
        from timm.data import create_transform

        tf = create_transform(input_size=(3, size, size), is_training=training, interpolation=d["interpolation"],
                              crop_pct=d["crop_pct"], normalize=False)
        return [t for t in tf.transforms if type(t).__name__ not in _TIMM_TENSOR_STEPS]
    if augment == "reference":
        square = T.Resize((d["resize"], d["resize"]))
        if training:
            return [square, T.RandomCrop(size, padding=8), T.RandomHorizontalFlip()]
        return [square, T.CenterCrop(size)]
    if augment == "reference-lt":
        if training:
            return [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.0)]
        return [T.Resize(d["resize"]), T.CenterCrop(size)]
    raise DiffmixError(f"unknown augment {augment!r} in the data config; expected one of {', '.join(AUGMENTS)}")


def to_input(d: dict) -> list:
    """The final step: 8-bit RGB pixels -> float CHW tensor normalised for the model."""
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(tuple(d["mean"]), tuple(d["std"]))]


@functools.lru_cache(maxsize=8)
def _pipeline(key: str, training: bool):
    from torchvision import transforms as T

    d = json.loads(key)
    return T.Compose(augmentations(d, training) + to_input(d))


def pipeline(d: dict, training: bool):
    """The whole pipeline (cached per process: data workers build it once, not per batch)."""
    return _pipeline(json.dumps(d, sort_keys=True), training)


def describe(d: dict) -> str:
    """One line for the start-of-run summary."""
    if d.get("augment", "timm") == "timm":
        return f"timm's pipeline at {d['img_size']} px"
    return (f"{d['augment']} pipeline, res mode {d['res_mode']} (resize {d['resize']} -> crop {d['img_size']}), "
            "ImageNet normalisation")
