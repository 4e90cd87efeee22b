"""The sample world: coloured shapes drawn procedurally from a seed (nothing to download), and a judge
that reads an image's colour and shape by measurement.

Each class is one colour and one shape ("red circle", "green bar"); images vary in size, position,
rotation, shade and background texture. Some classes differ only a little: the same shape in near
colours (red/orange circle, blue/purple triangle) or the same colour in near shapes (red circle/ring,
green square/bar). Backgrounds are grey textures of low saturation and shapes are saturated, which is
what lets the judge find the shape without learning anything.

The judge (`judge`) is a measurement, not a model: the hue of the saturated pixels names the colour,
and four numbers about their mask name the shape (a hole: ring; elongation: bar; solidity: plus; area
over squared radius: circle > square > triangle). It is independent of every model the project trains,
so it can say whether a generated image shows the class it was asked for. It is shared by the prepare
stage (data/sample.py), the sample models' training (models/sample_train.py) and the tests."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPER_CLASS = "shape"
# Hue in degrees of each colour word (HSV), far enough apart that the judge's nearest-hue rule holds.
COLOURS = {"red": 0.0, "orange": 30.0, "yellow": 56.0, "green": 125.0, "cyan": 185.0, "blue": 228.0,
           "purple": 276.0, "pink": 322.0}
SHAPES = ("circle", "ring", "square", "bar", "triangle", "plus")
# (colour, shape) of each class, in label order. The first four are far apart (the 4-class datasets
# the plumbing tests draw); the fine-grained pairs follow.
CLASSES = (
    ("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "plus"),
    ("orange", "circle"),  # near colour of red circle
    ("red", "ring"),  # near shape of red circle
    ("green", "bar"),  # near shape of green square
    ("purple", "triangle"),  # near colour of blue triangle
    ("cyan", "circle"), ("pink", "square"), ("blue", "ring"), ("yellow", "bar"),
)
CLASS_NAMES = tuple(f"{c} {s}" for c, s in CLASSES)
CAPTION = "a photo of a {name} " + SUPER_CLASS  # = contracts.DEFAULT_PROMPT_TEMPLATE with a class name
# Words the world's captions and the score's prompts use: the sample models' tokenizer gives each one token.
WORDS = tuple(COLOURS) + SHAPES + (SUPER_CLASS, "with", "without", "it")
HUE_JITTER = 4.0  # degrees, within a class
ROTATION = 20.0  # degrees either way, for the shapes that have corners
SUPERSAMPLE = 4  # drawn this many times larger, then reduced: smooth edges at any size


@dataclass(frozen=True)
class Draw:
    """What one image shows: everything drawn from the rng, so the image is a function of the seed."""

    colour: tuple[int, int, int]
    radius: float  # fraction of the side
    centre: tuple[float, float]  # fractions of the side
    angle: float  # degrees
    background: str
    bg_level: float
    bg_contrast: float
    bg_tint: tuple[float, float, float]


def _sample_draw(colour: str, rng: np.random.Generator) -> Draw:
    hue = (COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360
    sat, val = rng.uniform(0.72, 1.0), rng.uniform(0.72, 1.0)
    rgb = tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue / 360, sat, val))
    radius = rng.uniform(0.24, 0.34)
    margin = radius + 0.04
    centre = (rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))
    return Draw(rgb, radius, centre, rng.uniform(-ROTATION, ROTATION), str(rng.choice(BACKGROUNDS)),
                rng.uniform(0.35, 0.7), rng.uniform(0.05, 0.18), tuple(rng.uniform(-0.03, 0.03, size=3)))


BACKGROUNDS = ("noise", "stripes", "checker", "gradient")


def _background(d: Draw, rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey texture (low saturation, so the judge never mistakes it for the shape): float (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if d.background == "noise":
        base = rng.normal(0, 1, (size, size))
    elif d.background == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.12, 0.3)
        base = np.sign(np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period))
    elif d.background == "checker":
        period = rng.uniform(0.15, 0.35)
        base = np.where((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0, 1.0, -1.0)
    else:
        theta = rng.uniform(0, 2 * math.pi)
        base = 2 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
    grey = d.bg_level + d.bg_contrast * base + rng.normal(0, 0.02, (size, size))
    return np.clip(grey[..., None] + np.asarray(d.bg_tint), 0, 1)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """The shape's outline(s) as polygons in pixels, rotated by `angle`; circles and rings are handled apart."""
    if shape == "square":
        h = 0.86 * r
        pts = [[(-h, -h), (h, -h), (h, h), (-h, h)]]
    elif shape == "bar":
        pts = [[(-r, -0.42 * r), (r, -0.42 * r), (r, 0.42 * r), (-r, 0.42 * r)]]
    elif shape == "triangle":
        c = 1.12 * r  # circumradius
        pts = [[(c * math.cos(a), c * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]]
    elif shape == "plus":
        w = 0.3 * r
        pts = [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [[(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in poly] for poly in pts]


def draw(colour: str, shape: str | None, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of `colour` `shape` (shape None: the background alone), all variation from `rng`."""
    d = _sample_draw(colour, rng)
    big = size * SUPERSAMPLE
    # the texture at the output size (its pixels stay sharp), the shape drawn large and reduced (smooth edges)
    texture = Image.fromarray((_background(d, rng, size) * 255).round().astype(np.uint8), "RGB")
    texture = texture.resize((big, big), Image.Resampling.NEAREST)
    bg = texture.copy()
    if shape is not None:
        canvas = ImageDraw.Draw(bg)
        cx, cy, r = d.centre[0] * big, d.centre[1] * big, d.radius * big
        if shape in ("circle", "ring"):
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=d.colour)
            if shape == "ring":
                inner = 0.55 * r
                hole = Image.new("L", (big, big), 0)
                ImageDraw.Draw(hole).ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=255)
                bg.paste(texture, (0, 0), hole)
        else:
            for poly in _polygon(shape, cx, cy, r, d.angle):
                canvas.polygon(poly, fill=d.colour)
    return bg.resize((size, size), Image.Resampling.BOX)


def draw_class(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    colour, shape = CLASSES[label]
    return draw(colour, shape, rng, size)


def caption(label: int) -> str:
    return CAPTION.format(name=CLASS_NAMES[label])


# -------------------------------------------------------------------------------------------------
# The judge
# -------------------------------------------------------------------------------------------------
SATURATED = 0.42  # a pixel with HSV saturation above this (and not dark) belongs to the shape
MIN_PIXELS = 0.025  # of the image: fewer saturated pixels than this is "no shape"
NONE = -1  # judge's label for an image that shows none of the classes


@dataclass(frozen=True)
class Judgement:
    label: int  # class index, or NONE
    colour: str | None
    shape: str | None
    features: dict


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-9), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(delta, 1e-9)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    return hue, sat, mx


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _convex_area(mask: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    # the corners of every pixel, so a hull of pixels covers them as the area counts them
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(ConvexHull(pts).volume)
    except QhullError:
        return float(mask.sum())


def shape_features(mask: np.ndarray) -> dict:
    """Measurements of a binary mask that tell the world's shapes apart whatever their size and rotation."""
    filled = _fill_holes(mask)
    area, filled_area = float(mask.sum()), float(filled.sum())
    ys, xs = np.nonzero(filled)
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([xs - cx, ys - cy])) if len(xs) > 2 else np.eye(2)
    ev = np.sort(np.linalg.eigvalsh(cov + 1e-6 * np.eye(2)))
    z = (xs - cx) + 1j * (ys - cy)
    r = np.abs(z)
    # complex moments: |sum z^k| / sum |z|^k is 0 for a shape symmetric under a 1/k turn... of the
    # wrong order, and large for a k-fold one: order 3 marks the triangle, order 4 the square (and plus)
    return {"hole": (filled_area - area) / filled_area, "elongation": float(ev[1] / ev[0]),
            "solidity": filled_area / _convex_area(filled),
            "threefold": float(abs((z ** 3).sum()) / max((r ** 3).sum(), 1e-9)),
            "fourfold": float(abs((z ** 4).sum()) / max((r ** 4).sum(), 1e-9)), "pixels": area}


def name_shape(f: dict) -> str:
    """The shape a mask's features describe (thresholds halfway, in ratio, between the shapes' values)."""
    if f["hole"] > 0.06:
        return "ring"  # ~0.3 (a hole of 0.55 the radius); 0 for the rest
    if f["elongation"] > 2.6:
        return "bar"  # eigenvalue ratio of the second moments: ~5.8 (aspect 2.4); <= 1.4 for the rest
    if f["threefold"] > 0.3:
        return "triangle"  # ~0.6; <= 0.15 for the rest
    if f["solidity"] < 0.86:
        return "plus"  # ~0.7 (blurred: <= 0.83); >= 0.88 for square and circle
    return "square" if f["fourfold"] > 0.18 else "circle"  # ~0.42 against <= 0.1


def name_colour(hue: np.ndarray, weight: np.ndarray) -> tuple[str, float]:
    """The colour word nearest to the weighted circular mean of `hue` (degrees), and that mean."""
    rad = np.radians(hue)
    mean = math.degrees(math.atan2(float((weight * np.sin(rad)).sum()), float((weight * np.cos(rad)).sum()))) % 360
    word = min(COLOURS, key=lambda c: abs((COLOURS[c] - mean + 180) % 360 - 180))
    return word, mean


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """The class an image shows, by measurement (see the module's docstring); NONE when no shape is found
    or its colour and shape are no class of the world."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    hue, sat, val = _hsv(rgb)
    mask = (sat > SATURATED) & (val > 0.3)
    if mask.sum() < MIN_PIXELS * mask.size:
        return Judgement(NONE, None, None, {"pixels": float(mask.sum())})
    mask = _largest_component(mask)
    colour, mean_hue = name_colour(hue[mask], sat[mask])
    features = shape_features(mask)
    features["hue"] = mean_hue
    shape = name_shape(features)
    label = CLASSES.index((colour, shape)) if (colour, shape) in CLASSES else NONE
    return Judgement(label, colour, shape, features)


def judge_labels(images) -> np.ndarray:
    """The judge's label (or NONE) for each image of an iterable of PIL images or uint8 arrays."""
    return np.array([judge(im).label for im in images], dtype=np.int64)
