"""The threads that do a CPU actor's torch work.

Ray Data calls an actor's constructor and its batches from threads of Ray's choosing, not the
thread that built the actor. torch's CPU kernels run on OpenMP (libgomp), whose thread team and
settings belong to the thread that starts them:
- every calling thread gets its own team, and once libgomp manages more threads than the actor has
  CPUs it stops spinning at its barriers and sleeps instead (a futex round trip per parallel
  region): measured, 2 threads on 2 cores, the bench model ran 10-20% slower that way;
- `torch.set_flush_denormal` sets a per-thread register (MXCSR), inherited only by threads created
  after it: set in the constructor, it did not apply where the batches ran.
So a CPU actor does its set-up, the thread settings and every batch on threads of its own.

`streams` > 1 splits the actor's CPUs into independent single-threaded streams, each running whole
device batches, instead of one OpenMP team splitting every operation. A team waits at every
barrier for its slowest member, so each time another process preempts one member (Ray's own
processes wake ~1,300 times a second on a small node) all members stall; independent streams lose
only the preempted one's time. On a GPU the host threads only launch kernels, and the work stays
on the calling thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def on_cpu(device: str | None) -> bool:
    """Whether a model for `device` (None: CUDA when there is one) runs on the CPU."""
    return not (device or "").startswith("cuda") and (device is not None or not torch.cuda.is_available())


class TorchThreads:
    """`run(fn, ...)` calls fn on one of this actor's torch threads, and `map(fn, items)` spreads
    the items over all of them (`streams` threads sharing `threads` torch threads) on the CPU; on
    a GPU both run in place, on the calling thread."""

    def __init__(self, cpu: bool, threads: int | None = None, streams: int = 1):
        self.streams = max(1, int(streams)) if cpu else 1
        per_stream = max(1, int(threads) // self.streams) if threads else None
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="torch", initializer=_configure,
                                        initargs=(per_stream,)) if cpu else None

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()  # re-raises fn's exception here

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(item) for item in items], in that order; concurrently when there are streams. Call it
        from outside the pool: a pool thread waiting on its siblings would idle a stream."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))  # re-raises the first failed item's exception


def _configure(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(max(1, int(threads)))  # = the CPUs Ray granted this actor (or stream)
    # Denormal floats (|x| < 1e-38) are computed in microcode on x86, 10-100x slower; a UNet's
    # activations can drift into them (measured: img2img 3x slower on some inputs). Flushing them
    # to zero changes no visible pixel.
    torch.set_flush_denormal(True)
