"""Turn raw image files into the canonical encoding: 8-bit RGB, JPEG or PNG.

Bytes are kept as they are when they already are an RGB JPEG/PNG with no EXIF rotation (no
re-compression loss); anything else (CMYK, alpha, palette, 16-bit, grayscale, BMP/WebP, rotated)
is converted to RGB and re-encoded: JPEG sources stay JPEG (quality 95), others become PNG.

Decoding memory is bounded: a small file can declare a huge image (13000 x 13000 RGBA is 657 KB of
PNG and GBs of pixels). The header is read first (PIL opens lazily); an image above PIL's pixel cap,
or one whose decode would need more than the machine's decode budget, is a bad image without a
pixel decoded; and the decodes in flight together stay within the budget (DecodeBudget)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import threading
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
JPEG_QUALITY = 95
# A decompression-bomb guard is still wanted, but fine-grained datasets hold large photos:
# allow up to ~180 MP before PIL refuses.
Image.MAX_IMAGE_PIXELS = 180_000_000


# Peak bytes per pixel while decoding and converting to RGB: the decoded pixels twice (exif_transpose
# returns a copy) plus the conversion's own images (an RGBA composite makes a background, the composite
# and the RGB result) and encoder buffers. Measured: a 13000 x 13000 RGBA PNG peaks at 4.0 GB RSS in
# `prepare` (24 B/pixel, this estimate), where the bytes-per-band count alone (4 B/pixel) said 0.7 GB.
CONVERT_BYTES_PER_PIXEL = {"RGB": 3, "L": 3, "I": 20, "I;16": 20, "I;16B": 20, "I;16L": 20, "I;16N": 20}
CONVERT_BYTES_PER_PIXEL_OTHER = 16
DECODE_SHARE = 0.25  # of the machine's memory (or its container's limit) that decoding may hold at once
DECODE_BUDGET_ENV = "DIFFMIX_DECODE_MEMORY_GB"


def decode_cost(width: int, height: int, mode: str) -> int:
    """Bytes decoding a width x height image of PIL `mode` into RGB may hold at its peak."""
    bands = Image.getmodebands(mode) if mode in Image.MODES else 4
    per_band = 2 if "16" in mode else 4 if mode in ("I", "F") else 1
    return width * height * (2 * bands * per_band + CONVERT_BYTES_PER_PIXEL.get(mode, CONVERT_BYTES_PER_PIXEL_OTHER))


def machine_memory_bytes() -> int:
    """Physical memory, or the container's memory limit (cgroup v2 or v1) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                total = min(total, int(f.read().strip()))
    return total


def decode_budget_bytes() -> int:
    """The memory decodes in flight may hold together: DECODE_SHARE of the machine's, or
    DIFFMIX_DECODE_MEMORY_GB when set."""
    given = os.environ.get(DECODE_BUDGET_ENV)
    if given is None:
        return int(machine_memory_bytes() * DECODE_SHARE)
    try:
        gb = float(given)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb <= 0:
        from .errors import DiffmixError

        raise DiffmixError(f"{DECODE_BUDGET_ENV}={given!r} must be a positive number of GB")
    return int(gb * 2**30)


class DecodeBudget:
    """A weighted semaphore over bytes: `reserve(cost)` waits until the decodes in flight leave room
    for `cost` (one decode always proceeds alone), so threads x image sizes never exceed `limit`."""

    def __init__(self, limit: int):
        self.limit, self._used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = min(cost, self.limit)
        with self._cond:
            while self._used and self._used + cost > self.limit:
                self._cond.wait()
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._used -= cost
                self._cond.notify_all()


class BadImage(ValueError):
    """The bytes are not a decodable image; the message says why. It never names the file (these
    functions see bytes only): callers prefix the file or row, as `prepare` does."""


# PIL puts the repr of the stream it was handed into some messages ("cannot identify image file
# <_io.BytesIO object at 0x7f...>"): meaningless to a user, and it hides which file is bad.
_STREAM_REPR = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def _reason(err: BaseException) -> str:
    text = _STREAM_REPR.sub("", str(err)).strip()
    if isinstance(err, Image.UnidentifiedImageError):
        text = "cannot identify the image format (not an image, or a format PIL cannot read)"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the real range to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent pixels would otherwise become arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode `data` into an RGB PIL image (EXIF orientation applied)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decoded(lambda: Image.open(io.BytesIO(data)))


def _decoded(opened) -> Image.Image:
    """The RGB image of `opened()` (an image opened, maybe not yet loaded), or BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = opened()
            img.load()  # decodes every pixel: truncated files fail here, not later in a worker
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(_reason(e)) from e
    except MemoryError as e:  # a header the checks let through still cannot take the process down
        raise BadImage("MemoryError: the image is too large to decode here") from e


def _header(data: bytes) -> tuple[Image.Image, int, int]:
    """The lazily opened image and its size, read from the header only (no pixel decoded). An image
    above PIL's pixel cap is a BadImage here, named by its size."""
    try:
        probe = Image.open(io.BytesIO(data))
        width, height = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses twice its cap inside open(), naming the pixel count only
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImage(_too_large(int(found.group(1))) if found else _reason(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(_reason(e)) from e
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise BadImage(f"{width}x{height}: " + _too_large(width * height))
    return probe, width, height


def _too_large(pixels: int) -> str:
    return (f"{pixels / 1e6:.0f} MP, more than the {Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP any image may have (a "
            "decompression bomb, or a scan far larger than training needs); shrink it")


def canonicalize(data: bytes, budget: DecodeBudget | None = None) -> tuple[bytes, int, int]:
    """Return (canonical bytes, width, height); raise BadImage when `data` is not a usable image.
    With a `budget`, an image whose decode would need more than all of it is a BadImage (from its
    header, nothing decoded), and the decode waits until the budget has room for it."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    probe, width, height = _header(data)
    fmt, mode = probe.format, probe.mode
    cost = decode_cost(width, height, mode)
    if budget is not None and cost > budget.limit:
        raise BadImage(f"{width}x{height} {mode} needs ~{cost / 2**30:.1f} GB to decode, more than this machine's "
                       f"decode budget of {budget.limit / 2**30:.1f} GB ({DECODE_SHARE:.0%} of its memory; "
                       f"{DECODE_BUDGET_ENV} sets it); shrink the image")
    with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
        try:  # inside the reservation: reading a PNG's EXIF decodes its pixels
            rotated = probe.getexif().get(0x0112, 1) not in (1, None)  # EXIF Orientation
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(_reason(e)) from e
        img = _decoded(lambda: probe)  # the image already opened (and for a PNG, loaded): decoded once
    if fmt in ("JPEG", "PNG") and mode == "RGB" and not rotated:
        return data, img.width, img.height
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue(), img.width, img.height


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
