"""torch.compile with a shared cache: the first process compiles (minutes for an SD UNet) and
stores the compiler's artifacts under a URI (local folder or s3://); every later process with the
same key loads them before compiling and starts warm.

The artifacts are torch's own portable cache (`torch.compiler.save_cache_artifacts`): inductor
kernels and autotuning results. They hold no weights (inductor takes parameters as inputs), so a
fine-tuned model reuses the base model's entry as long as its architecture and shapes match."""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from .. import storage

log = logging.getLogger(__name__)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class CompileCache:
    """One cache entry: `<uri>/<name>-<hash of key, torch version, device>.bin`."""

    def __init__(self, uri: str | None, name: str, key: dict, device: torch.device):
        self.uri = storage.normalize(uri) if uri else None
        full_key = key | {"torch": torch.__version__, "device": _device_name(device)}
        digest = hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.entry = storage.join(self.uri, f"{name}-{digest}.bin") if self.uri else None
        self.loaded = False

    def load(self) -> bool:
        """Load the entry's artifacts into this process's compiler caches (before compiling)."""
        if not self.entry or not storage.exists(self.entry):
            return False
        info = torch.compiler.load_cache_artifacts(storage.read_bytes(self.entry))
        self.loaded = info is not None
        log.info("compile cache %s: %s", self.entry, "loaded" if self.loaded else "empty")
        return self.loaded

    def save(self) -> bool:
        """Store what this process compiled (after the first compiled call), unless it started
        from the cache. Concurrent writers of one entry are harmless: writes are atomic and
        every writer's artifacts serve the same key."""
        if not self.entry or self.loaded:
            return False
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return False
        storage.write_bytes_atomic(self.entry, artifacts[0])
        log.info("compile cache %s: saved %d bytes", self.entry, len(artifacts[0]))
        return True
