"""A built-in sample dataset, drawn procedurally (nothing to download): each class is a shape of
its own colour on a textured background, so a small classifier can separate the classes and the
whole pipeline can be exercised end to end on a CPU."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_CLASSES = (
    ("red circle", (220, 40, 40), "ellipse"),
    ("green square", (40, 180, 60), "rectangle"),
    ("blue triangle", (40, 70, 220), "triangle"),
    ("yellow diamond", (230, 200, 40), "diamond"),
    ("purple ring", (150, 60, 190), "ring"),
    ("orange bar", (240, 140, 30), "bar"),
)
SAMPLE_SUPER_CLASS = "shape"


def draw_sample(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    _, colour, shape = SAMPLE_CLASSES[class_index]
    noise = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.22, 0.34))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    jitter = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ellipse":
        draw.ellipse(box, fill=jitter)
    elif shape == "rectangle":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=jitter)
    elif shape == "ring":
        draw.ellipse(box, outline=jitter, width=max(3, r // 3))
    else:
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=jitter)
    return img


def write_sample_imagefolder(root: str, num_classes: int = 4, per_class: int = 24, seed: int = 0,
                             size: int = 64) -> str:
    """Write root/<class>/<nnn>.jpg and return root. Deterministic for (classes, per_class, seed)."""
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
