"""The benchmarks' inputs, written the same way for every case: the sample dataset, CUB-like JPEGs
and datasets of them, a model preset written once, a random concept bank, and a plain diffusers
img2img pipeline. Every import is inside a function: the GPU scripts run where Ray is not installed."""

from __future__ import annotations

import io
import os

SOURCE_SIZE = (500, 375)  # CUB's typical JPEG; generate writes translations back at the source's size


def sample_dataset(work: str, classes: int = 4, per_class: int = 24, size: int = 64, val_fraction: float = 0.0,
                   super_class: str | None = None) -> str:
    """The built-in sample dataset (a shape per class, `size` px) prepared into work/dataset."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder

    raw = write_sample_imagefolder(os.path.join(work, "raw"), num_classes=classes, per_class=per_class, size=size)
    dataset = os.path.join(work, "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=super_class or SAMPLE_SUPER_CLASS,
                          val_fraction=val_fraction), dataset, show_progress=False)
    return dataset


def cub_like_image(i: int, rng, fit: str = "resize"):
    """The i-th CUB-sized (500x375) sample image of class i % 4: a 500 px sample drawing, resized
    (`fit` "resize") or centre-cropped ("crop") to 500x375."""
    from diffmix_ray.data.sample import draw_sample

    w, h = SOURCE_SIZE
    img = draw_sample(i % 4, rng, size=w)
    return img.resize(SOURCE_SIZE) if fit == "resize" else img.crop((0, (w - h) // 2, w, (w + h) // 2))


def jpeg(img, quality: int = 95, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def cub_like_dataset(work: str, images: int, fit: str = "resize", quality: int = 95,
                     super_class: str | None = None) -> str:
    """`images` CUB-like JPEGs over 4 classes (see cub_like_image), prepared into work/dataset, all train."""
    import numpy as np

    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_CLASSES, SAMPLE_SUPER_CLASS

    rng = np.random.default_rng(0)
    raw = os.path.join(work, "raw")
    for i in range(images):
        folder = os.path.join(raw, SAMPLE_CLASSES[i % 4][0])
        os.makedirs(folder, exist_ok=True)
        cub_like_image(i, rng, fit).save(os.path.join(folder, f"{i:04d}.jpg"), format="JPEG", quality=quality)
    dataset = os.path.join(work, "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=super_class or SAMPLE_SUPER_CLASS, val_fraction=0.0),
            dataset, show_progress=False)
    return dataset


def model_folder(work: str, preset: str, device: str, model: str | None = None) -> str:
    """`model` if given (a folder already written), else the preset written to work/model: fp16 on
    CUDA, fp32 on a CPU."""
    if model:
        return model
    from diffmix_ray.models.loader import write_model

    return write_model(preset, os.path.join(work, "model"), dtype="float16" if device.startswith("cuda") else "float32")


def random_bank(work: str, model: str, dataset: str) -> str:
    """A concept bank for the dataset's classes with random weights, in work/bank. A modest LoRA: it
    changes the images without pushing random weights out of fp16's range."""
    from diffmix_ray import canonical
    from diffmix_ray.models.concepts import write_random_bank

    info = canonical.open_dataset(dataset).info
    return write_random_bank(os.path.join(work, "bank"), model, info.classes, info.super_class, info.fingerprint,
                             lora_std=0.02)


def img2img_pipeline(model: str, device: str = "cpu", dtype=None):
    """A plain diffusers img2img pipeline as a user loads it, with DPM-Solver++ and no progress bars."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    kwargs = {"dtype": dtype} if dtype is not None else {}
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                          **kwargs).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe
