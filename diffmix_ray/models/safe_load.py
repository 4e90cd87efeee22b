"""Loading torch checkpoints without running code.

torch.load unpickles: a checkpoint in a shared output (an S3 prefix others can write) could hold an
object whose unpickling runs code. weights_only=True admits tensors and plain containers only; what
this project saves is exactly that, so a file that needs more is refused, named."""

from __future__ import annotations

import io
import pickle
from typing import Any

from ..errors import DiffmixError


def load_plain(source: str | bytes, where: str) -> Any:
    """torch.load of a file path or bytes with weights_only=True, onto the CPU."""
    import torch

    try:
        return torch.load(source if isinstance(source, str) else io.BytesIO(source), map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as e:
        reason = (str(e).strip().splitlines() or ["unpickling failed"])[0][:200]
        raise DiffmixError(f"{where} is not a plain checkpoint (tensors, numbers, strings, lists, dicts): loading it "
                           f"would run pickled code, so it is refused ({reason}). If diffmix-ray did not write it, "
                           "someone else did: delete it, or start the run again with --overwrite") from None
