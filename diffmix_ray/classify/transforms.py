"""The classifier's image pipelines, defined here once for training, per-epoch evaluation and
`evaluate`. A pipeline is the augmentation steps (geometry and colour on 8-bit RGB pixels) followed
by one final step, `ToInput`, that turns pixels into the model's input (float, normalised).

The augmentation steps run where the images are decoded: on the Ray Data workers (PIL in, PIL out,
then `ToPixels`: uint8 HWC arrays, a quarter of float32's bytes), or with --gpu-decode on the GPU
(`tensor_augmentations`: the same steps as torchvision.transforms.v2 on uint8 CHW tensors, translated
from the PIL steps so the two cannot drift apart). `ToInput` runs on the training device: ToTensor's
/255 and Normalize's (x - mean) / std, in the same order and precision as before they moved there.

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
        from timm.data import resolve_data_config

        from ..models.classifier import create_classifier

        cfg = resolve_data_config({}, model=create_classifier(arch, num_classes=2))
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


class ToPixels:
    """The data workers' last step: PIL image -> uint8 HWC array (np.asarray: no transpose, no float)."""

    def __call__(self, img):
        import numpy as np

        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def __repr__(self) -> str:
        return "ToPixels(uint8 HWC)"


class ToInput:
    """The final step, on the training device: uint8 pixels -> float NCHW normalised for the model.
    `layout` is how the pixels arrive: NHWC from the data workers, NCHW from --gpu-decode.
    channels_last: the result has NHWC strides (convolutions on tensor cores read them directly);
    from NHWC pixels that is a free view, so only the uint8 copy is ever re-laid out."""

    def __init__(self, d: dict, device, channels_last: bool = False):
        import torch

        self.mean = torch.tensor(d["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(d["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, pixels, layout: str = "NHWC"):
        import torch

        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise DiffmixError(f"ToInput expects a uint8 batch of images (4 dimensions), got {pixels.dtype} "
                               f"{tuple(pixels.shape)}")
        x = pixels.permute(0, 3, 1, 2) if layout == "NHWC" else pixels
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        # ToTensor then Normalize: x / 255, then (x - mean) / std, in float32 as they computed it
        return x.float().div_(255).sub_(self.mean).div_(self.std)


@functools.lru_cache(maxsize=8)
def _pipeline(key: str, training: bool):
    from torchvision import transforms as T

    d = json.loads(key)
    return T.Compose(augmentations(d, training) + [ToPixels()])


def pipeline(d: dict, training: bool):
    """What the data workers run: augmentation + ToPixels (cached per process: data workers build it
    once, not per batch). The model's input is `ToInput(d, device)` of a stack of its outputs."""
    return _pipeline(json.dumps(d, sort_keys=True), training)


def tensor_augmentations(d: dict, training: bool):
    """The augmentation steps of `d` as torchvision.transforms.v2 on uint8 CHW tensors (any device),
    for --gpu-decode: each PIL step translated with its parameters."""
    from torchvision.transforms import v2

    steps = []
    for t in augmentations(d, training):
        name = type(t).__name__
        if name == "Resize":
            steps.append(v2.Resize(t.size, interpolation=t.interpolation, max_size=t.max_size, antialias=True))
        elif name == "CenterCrop":
            steps.append(v2.CenterCrop(t.size))
        elif name == "RandomCrop":
            steps.append(v2.RandomCrop(t.size, padding=t.padding, pad_if_needed=t.pad_if_needed, fill=t.fill,
                                       padding_mode=t.padding_mode))
        elif name == "RandomHorizontalFlip":
            steps.append(v2.RandomHorizontalFlip(t.p))
        elif name in ("RandomResizedCrop", "RandomResizedCropAndInterpolation") and not isinstance(
                t.interpolation, (tuple, list)):  # timm's "random" interpolation has no tensor version
            steps.append(v2.RandomResizedCrop(t.size, scale=t.scale, ratio=t.ratio, interpolation=t.interpolation,
                                              antialias=True))
        elif name == "ColorJitter":
            steps.append(v2.ColorJitter(t.brightness, t.contrast, t.saturation, t.hue))
        else:
            raise DiffmixError(f"--gpu-decode: the {d.get('augment', 'timm')} pipeline's step {t!r} has no tensor "
                               "version here; run without --gpu-decode (the data workers then decode and augment "
                               "on CPU)")
    return v2.Compose(steps)


def describe(d: dict) -> str:
    """One line for the start-of-run summary."""
    if d.get("augment", "timm") == "timm":
        return f"timm's pipeline at {d['img_size']} px"
    return (f"{d['augment']} pipeline, res mode {d['res_mode']} (resize {d['resize']} -> crop {d['img_size']}), "
            "ImageNet normalisation")
