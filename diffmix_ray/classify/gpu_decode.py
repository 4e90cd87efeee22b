"""--gpu-decode: image bytes decoded on the training GPU (nvJPEG, through torchvision.io.decode_jpeg)
and augmented there (transforms.tensor_augmentations), for nodes with few CPU cores per GPU. The data
workers then only pick rows and ship their encoded bytes. Plain torch, no Ray; it runs on a CPU too
(torchvision's CPU decoders), which is how the tests exercise it."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import DiffmixError

JPEG_MAGIC = b"\xff\xd8\xff"


def _as_tensor(blob) -> torch.Tensor:
    """Encoded bytes as the 1-D uint8 CPU tensor torchvision's decoders take (a copy: bytes are read-only)."""
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def _bad(where: Callable[[int], str] | None, i: int, err: Exception) -> DiffmixError:
    place = where(i) if where is not None else f"image {i} of the batch"
    return DiffmixError(f"cannot decode the image at {place}: {type(err).__name__}: {err}. The file was changed or "
                        "damaged after it was written: re-run the stage that wrote it (prepare or generate)")


def decode(blobs: Sequence, device, where: Callable[[int], str] | None = None) -> list[torch.Tensor]:
    """RGB uint8 CHW tensors on `device`, one per encoded image. JPEGs (canonical datasets and synthetic
    shards are JPEG, or PNG where the source was not) are decoded in one batched call on a GPU;
    anything else is decoded on the CPU and moved. `where(i)` names image i in an error."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    tensors = [_as_tensor(b) for b in blobs]
    jpeg = [i for i, b in enumerate(blobs) if bytes(b[:3]) == JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    if jpeg:
        try:
            decoded = decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the batched call: find it, name it
            for i in jpeg:
                try:
                    decode_jpeg(tensors[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as e:
                    raise _bad(where, i, e) from None
            raise
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, t in enumerate(tensors):
        if out[i] is None:
            try:
                out[i] = decode_image(t, mode=ImageReadMode.RGB).to(device, non_blocking=True)
            except RuntimeError as e:
                raise _bad(where, i, e) from None
    return out


def augment(images: Sequence[torch.Tensor], tf) -> torch.Tensor:
    """The augmentation `tf` (a v2 pipeline ending at a fixed size) on each image, stacked: NCHW uint8.
    One image at a time: decoded images differ in size, and every image draws its own random crop."""
    return torch.stack([tf(img) for img in images])
