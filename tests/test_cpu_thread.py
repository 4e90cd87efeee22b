"""models/cpu_thread.py: a CPU actor's torch work runs on one thread, whichever thread calls it."""

import threading

import pytest
import torch

from diffmix_ray.models.cpu_thread import TorchThread, on_cpu


def _state():
    # A product that is a float32 denormal comes out 0 where the thread flushes denormals.
    return threading.get_ident(), torch.get_num_threads(), (torch.full((4,), 1e-40) * 1.5).sum().item()


def test_every_call_runs_on_one_configured_thread_whoever_calls():
    worker = TorchThread(cpu=True, threads=1)
    seen = [worker.run(_state)]
    caller = threading.Thread(target=lambda: seen.append(worker.run(_state)))
    caller.start()
    caller.join()
    (first, threads, denormal), (second, _, _) = seen
    assert first == second != threading.get_ident()  # the same thread for both callers, not theirs
    assert threads == 1 and denormal == 0.0  # set-up applied where the work runs
    with pytest.raises(ValueError, match="boom"):  # the work's errors reach the caller
        worker.run(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_on_a_gpu_the_work_stays_on_the_calling_thread():
    assert TorchThread(cpu=False).run(threading.get_ident) == threading.get_ident()
    assert on_cpu("cpu") and not on_cpu("cuda") and not on_cpu("cuda:1")
    assert on_cpu(None) == (not torch.cuda.is_available())
