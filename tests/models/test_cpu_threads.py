"""models/cpu_threads.py: a CPU actor's torch work runs on threads of its own, whichever thread calls it."""

import threading

import pytest
import torch

from diffmix_ray.models.cpu_threads import TorchThreads, on_cpu


def _state():
    # A product that is a float32 denormal comes out 0 where the thread flushes denormals.
    return threading.get_ident(), torch.get_num_threads(), (torch.full((4,), 1e-40) * 1.5).sum().item()


def test_every_call_runs_on_one_configured_thread_whoever_calls():
    worker = TorchThreads(cpu=True, threads=1)
    seen = [worker.run(_state)]
    caller = threading.Thread(target=lambda: seen.append(worker.run(_state)))
    caller.start()
    caller.join()
    (first, threads, denormal), (second, _, _) = seen
    assert first == second != threading.get_ident()  # the same thread for both callers, not theirs
    assert threads == 1 and denormal == 0.0  # set-up applied where the work runs
    with pytest.raises(ValueError, match="boom"):  # the work's errors reach the caller
        worker.run(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_streams_split_the_threads_and_map_keeps_the_order():
    streams = TorchThreads(cpu=True, threads=4, streams=2)
    both_in = threading.Barrier(2, timeout=60)  # broken unless two items run at once

    def item(k):
        both_in.wait()
        return k, _state()

    out = streams.map(item, [0, 1])
    assert [k for k, _ in out] == [0, 1]  # results in the items' order
    assert len({ident for _, (ident, _, _) in out}) == 2 and threading.get_ident() not in {o[1][0] for o in out}
    assert all(threads == 2 and denormal == 0.0 for _, (_, threads, denormal) in out)  # 4 threads / 2 streams


def test_on_a_gpu_the_work_stays_on_the_calling_thread():
    assert TorchThreads(cpu=False).run(threading.get_ident) == threading.get_ident()
    assert TorchThreads(cpu=False, threads=4, streams=2).map(lambda _: threading.get_ident(), [0, 1]) == \
        [threading.get_ident()] * 2
    assert on_cpu("cpu") and not on_cpu("cuda") and not on_cpu("cuda:1")
    assert on_cpu(None) == (not torch.cuda.is_available())
