"""Recording what would make a CUDA step wait for the device, on a CPU (shared by the fine-tune and
classifier step tests)."""

from __future__ import annotations

from typing import Callable

import torch


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records what would make a CUDA step wait for the device: reading a value (item/float/bool),
    copies to the host, and boolean-mask indexing (a nonzero). On CPU these are cheap, so they are
    recorded by name rather than timed. `on_host` are tensors that live on the host even in a GPU
    run (AdamW's step counters: PyTorch keeps them there so that reading them costs no sync)."""

    def __init__(self, on_host: Callable[[], set[int]]):
        super().__init__()
        self.step, self.events, self.on_host = 0, [], on_host

    def record(self, name: str, tensor) -> None:
        if not (isinstance(tensor, torch.Tensor) and id(tensor) in self.on_host()):
            self.events.append((self.step, name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = str(func.overloadpacket), kwargs or {}
        source = args[0] if args else None
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"):
            self.record(name, source)
        elif name == "aten._to_copy" and "device" in kwargs and kwargs["device"] != source.device:
            self.record(name, source)
        elif name.startswith("aten.index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in (args[1] if len(args) > 1 else ()) or ()):
            self.record(name, source)
        return func(*args, **kwargs)


class HostCopies(torch.overrides.TorchFunctionMode):
    """On CPU `.cpu()` and `.numpy()` dispatch nothing; record the calls."""

    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "numpy", "tolist", "item"):
            self.syncs.record(func.__name__, args[0] if args else None)
        return func(*args, **(kwargs or {}))
