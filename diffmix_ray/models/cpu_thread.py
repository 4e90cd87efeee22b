"""One thread for all of a CPU actor's torch work.

Ray Data calls an actor's constructor and its batches from threads of Ray's choosing, not the
thread that built the actor. torch's CPU kernels run on OpenMP (libgomp), whose thread team and
settings belong to the thread that starts them:
- every calling thread gets its own team, and once libgomp manages more threads than the actor has
  CPUs it stops spinning at its barriers and sleeps instead (a futex round trip per parallel
  region): measured, 2 threads on 2 cores, the bench model ran 10-20% slower that way;
- `torch.set_flush_denormal` sets a per-thread register (MXCSR), inherited only by threads created
  after it: set in the constructor, it did not apply where the batches ran.
So a CPU actor does its set-up, the thread settings and every batch on one thread of its own. On a
GPU the host threads only launch kernels, and the work stays on the calling thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def on_cpu(device: str | None) -> bool:
    """Whether a model for `device` (None: CUDA when there is one) runs on the CPU."""
    return not (device or "").startswith("cuda") and (device is not None or not torch.cuda.is_available())


class TorchThread:
    """`run(fn, ...)` calls fn on this actor's torch thread (on the CPU), or in place (on a GPU)."""

    def __init__(self, cpu: bool, threads: int | None = None):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="torch") if cpu else None
        if cpu:
            self.run(_configure, threads)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()  # re-raises fn's exception here


def _configure(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(max(1, int(threads)))  # = the CPUs Ray granted this actor
    # Denormal floats (|x| < 1e-38) are computed in microcode on x86, 10-100x slower; a UNet's
    # activations can drift into them (measured: img2img 3x slower on some inputs). Flushing them
    # to zero changes no visible pixel.
    torch.set_flush_denormal(True)
