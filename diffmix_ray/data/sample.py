"""The built-in sample dataset, drawn procedurally (nothing to download): the sample world's coloured
shapes (sample_world.py: 12 classes, some of them fine-grained pairs) as an ImageFolder, so the whole
pipeline can run end to end on a CPU, and, with the `sample` model and CLIP that were trained on the
same world, show the method at work."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from .. import sample_world

# (name, colour word, shape) per class, in label order
SAMPLE_CLASSES = tuple((name, colour, shape) for name, (colour, shape) in
                       zip(sample_world.CLASS_NAMES, sample_world.CLASSES))
SAMPLE_SUPER_CLASS = sample_world.SUPER_CLASS
SAMPLE_SIZE = 32  # pixels: the sample model's resolution


def draw_sample(class_index: int, rng: np.random.Generator, size: int = SAMPLE_SIZE) -> Image.Image:
    return sample_world.draw_class(class_index, rng, size)


def write_sample_imagefolder(root: str, num_classes: int = 4, per_class: int = 24, seed: int = 0,
                             size: int = SAMPLE_SIZE) -> str:
    """Write root/<class>/<nnn>.jpg for the first `num_classes` classes and return root.
    Deterministic for (classes, per_class, seed, size)."""
    if not 1 <= num_classes <= len(SAMPLE_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SAMPLE_CLASSES)}")
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, SAMPLE_CLASSES[c][0])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            draw_sample(c, rng, size).save(buf, format="JPEG", quality=92)
            with open(os.path.join(folder, f"{i:03d}.jpg"), "wb") as f:
                f.write(buf.getvalue())
    return root
