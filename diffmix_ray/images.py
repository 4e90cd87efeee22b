"""Turn raw image files into the canonical encoding: 8-bit RGB, JPEG or PNG.

Bytes are kept as they are when they already are an RGB JPEG/PNG with no EXIF rotation (no
re-compression loss); anything else (CMYK, alpha, palette, 16-bit, grayscale, BMP/WebP, rotated)
is converted to RGB and re-encoded: JPEG sources stay JPEG (quality 95), others become PNG."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
JPEG_QUALITY = 95
# A decompression-bomb guard is still wanted, but fine-grained datasets hold large photos:
# allow up to ~180 MP before PIL refuses.
Image.MAX_IMAGE_PIXELS = 180_000_000


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decodes every pixel: truncated files fail here, not later in a worker
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(_reason(e)) from e


def canonicalize(data: bytes) -> tuple[bytes, int, int]:
    """Return (canonical bytes, width, height); raise BadImage when `data` is not a usable image."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        probe = Image.open(io.BytesIO(data))
        fmt, mode = probe.format, probe.mode
        rotated = probe.getexif().get(0x0112, 1) not in (1, None)  # EXIF Orientation
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(_reason(e)) from e
    img = decode_rgb(data)
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
