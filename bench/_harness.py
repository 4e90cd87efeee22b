"""What every benchmark shares: its command line and results file, the rates it reports, how it times
rounds, samples a process tree, runs the CLI as a user does, and survives an out-of-memory batch.

A case (a bench_*.py script) declares its flags on a `Bench`, measures in a function, and records
its figures in the `Results` it is handed as it measures them:

    bench = Bench("prepare", __doc__)
    bench.parser.add_argument("--images", type=int, default=2000)

    def measure(args, results):
        ...
        results.update(local_to_local={"seconds": ...})

    if __name__ == "__main__":
        bench.main(measure)

The figures go to `--json PATH`, by default bench/results/<bench>-<device>-<config>.json (`config`
names the flags given other than their defaults), rewritten atomically after every update, so that a
run stopped at its time budget (a GPU session part) still leaves what it had measured. The cases
still print their figures as they go.

Standard library at import: the GPU scripts run where Ray is not installed, and gpu_session.py
imports this before anything else is."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import gc
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CLI = os.path.join(os.path.dirname(sys.executable), "diffmix-ray")
# Where to write, what to write with, and the device (named apart): left out of a results file's config.
NOT_CONFIG = {"json", "work", "model", "device"}


# ---------------------------------------------------------------------------------------------
# The results file and the command line
# ---------------------------------------------------------------------------------------------
class Results:
    """Figures, written to `path` (atomically) after every update; no file when `path` is None."""

    def __init__(self, path: str | None, **fields):
        self.path, self.data = path, dict(fields)
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def add(self, section: str, key: str, value) -> None:
        """data[section][key] = value."""
        self.data.setdefault(section, {})[key] = value
        self.write()

    def write(self) -> None:
        if self.path:
            write_json(self.path, self.data)


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path`, atomically: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def slug(text: str) -> str:
    """`text` as a piece of a file name: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9.,=+]+", "-", str(text).lower()).strip("-") or "none"


def config_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The flags given other than their defaults, as `flag=value` joined by '_' ('default' if none):
    one results file per setting, so that runs of different settings do not overwrite each other."""
    parts = []
    for key, value in vars(args).items():
        if key in NOT_CONFIG or value == parser.get_default(key):
            continue
        flag = key.replace("_", "-")
        parts.append(flag if value is True else f"no-{flag}" if value is False else f"{flag}={slug(value)}")
    name = "_".join(parts) or "default"
    if len(name) > 100:  # a file name has 255 bytes; keep it readable and unique
        import hashlib

        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


class Bench:
    """One benchmark: its parser (with --json), its results file and its run's record."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
        self.parser.add_argument("--json", default=None, help="write the figures here as they are measured "
                                 "(default: bench/results/<bench>-<device>-<config>.json)")
        self.results: Results | None = None

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """Parse the flags; the results file is named after the ones given, before the case fills in
        defaults that depend on the device."""
        args = self.parser.parse_args(argv)
        self.config = config_name(self.parser, args)
        return args

    def pick(self, flag: str, value: str | None, known: tuple[str, ...], default: list[str]) -> list[str]:
        """The comma-separated names of `value` (`default` if None); an unknown name stops the run."""
        names = [v.strip() for v in (value or ",".join(default)).split(",") if v.strip()]
        if unknown := sorted(set(names) - set(known)):
            self.parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
        return names

    def path(self, device: str, json_path: str | None = None) -> str:
        return json_path or os.path.join(RESULTS_DIR, f"{self.name}-{slug(device)}-{self.config}.json")

    def main(self, measure: Callable, device: str | Callable = "cpu", argv: list[str] | None = None):
        """Parse, open the results file, run `measure(args, results)`, and record how the run ended
        (`run.status`, `wall_s`) whatever happened; the file's path is printed last."""
        args = self.parse(argv)
        started = time.perf_counter()
        label = device(args) if callable(device) else device
        path = self.path(label, args.json)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        run = {"bench": self.name, "device": label, "config": self.config, "argv": shlex.join(argv or sys.argv[1:]),
               "started_at": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
               "load_at_start": round(os.getloadavg()[0], 1)}
        self.results = Results(path, run=run)
        status = "ok"
        try:
            return measure(args, self.results)
        except SystemExit as e:
            status = "ok" if e.code in (None, 0) else f"exit {e.code}"
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException as e:
            status = f"error: {type(e).__name__}: {e}"
            raise
        finally:
            run.update(status=status, args=vars(args), load_at_end=round(os.getloadavg()[0], 1))
            self.results.update(run=run, wall_s=round(time.perf_counter() - started, 1))
            print(f"figures: {path}", flush=True)


@contextlib.contextmanager
def workdir(path: str | None, prefix: str):
    """`path`, or a temporary folder removed afterwards."""
    work = path or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    try:
        yield work
    finally:
        if not path:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------
def rates(seconds: list[float], counts: list[int], warmup: int = 1) -> dict:
    """Items/s from consecutive intervals (seconds[i] produced counts[i]): over all of them, in steady
    state (all but the first `warmup`, which warm up), and the median of the steady intervals' rates,
    which a busy neighbour on a shared machine disturbs least. NaN where there is nothing to divide."""
    nan = float("nan")
    total = sum(counts) / sum(seconds) if sum(seconds) > 0 else nan
    steady_s, steady_n = seconds[warmup:], counts[warmup:]
    steady = sum(steady_n) / sum(steady_s) if steady_s else total
    per = sorted(n / s for n, s in zip(steady_n, steady_s)) or [total]
    return {"images": sum(counts), "seconds": sum(seconds), "images_per_s": total, "steady_images_per_s": steady,
            "median_images_per_s": per[len(per) // 2]}


def rounded(figures: dict, digits: int = 3) -> dict:
    """The figures with their floats rounded, nested dicts too (for the results file)."""
    return {k: round(v, digits) if isinstance(v, float) else rounded(v, digits) if isinstance(v, dict) else v
            for k, v in figures.items()}


def compare(results: Results, name: str, system: dict, ref: dict, note: str = "") -> None:
    """`name` = system / ref of the steady and the median rates (see `rates`), printed and recorded."""
    steady = system["steady_images_per_s"] / ref["steady_images_per_s"]
    median = system["median_images_per_s"] / ref["median_images_per_s"]
    print(f"{name} steady = {steady:.2f}, median = {median:.2f}{note}", flush=True)
    results.add("ratios", name, {"steady": round(steady, 3), "median": round(median, 3)})


def writes(folder: str, gap: float = 0.2) -> list[tuple[float, int]]:
    """(time, rows) of each write of parquet files into `folder`, by the files' mtimes: one write task
    writes all the files of one output block at once, so files less than `gap` s apart are one write."""
    import pyarrow.parquet as pq

    files = sorted((os.path.getmtime(os.path.join(folder, n)), pq.read_metadata(os.path.join(folder, n)).num_rows)
                   for n in os.listdir(folder) if n.endswith(".parquet"))
    out: list[list] = []
    for t, rows in files:
        if out and t - out[-1][0] < gap:
            out[-1][1] += rows
        else:
            out.append([t, rows])
    return [(t, n) for t, n in out]


def timeline(done: list[tuple[float, int]], started: float, wall: float, skip: int = 0) -> dict:
    """A run's figures from its writes (see `writes`) and its start (time.time()) and wall time. The
    rates run from write `skip` on: each interval between two writes is credited with the rows of the
    write that ends it (a first write also waits for its writer's start: `skip` 1 leaves it out too).
    startup_s: when the work began, the first write less the time its rows took at the steady rate."""
    times = [t for t, _ in done]
    rows = [n for _, n in done]
    r = rates([b - a for a, b in zip(times[skip:], times[skip + 1:])], rows[skip + 1:], warmup=0)
    nan = float("nan")
    return {"images": sum(rows), "wall_s": wall, "writes": len(done), "steady_images_per_s": r["steady_images_per_s"],
            "median_images_per_s": r["median_images_per_s"], "first_write_s": times[0] - started if times else nan,
            "startup_s": times[0] - started - rows[0] / r["steady_images_per_s"] if times else nan,
            "after_last_write_s": started + wall - times[-1] if times else nan}


# ---------------------------------------------------------------------------------------------
# Timing: warm-up and rounds
# ---------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds `fn()` took, until the device was done (`sync`)."""
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


class Rounds:
    """Rounds of `steps` steps run in turn for every variant, so that a neighbour's load falls on all of
    them alike; each round ends when the device is done (`sync`) and is timed in wall time and in this
    process's CPU time (which a neighbour disturbs much less). Rates are items per second, an item
    being `items_per_step` of whatever a step processes."""

    def __init__(self, variants: dict[str, Callable[[int], object]], items_per_step: float = 1,
                 sync: Callable[[], None] | None = None, before: Callable[[str], None] | None = None):
        self.variants, self.items_per_step, self.sync, self.before = variants, items_per_step, sync, before
        self.wall: dict[str, list[float]] = {name: [] for name in variants}
        self.cpu: dict[str, list[float]] = {name: [] for name in variants}

    def run(self, rounds: int, steps: int, after_round: Callable[[int], None] | None = None) -> None:
        for r in range(rounds):
            for name, fn in self.variants.items():
                if self.before:
                    self.before(name)
                if self.sync:
                    self.sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn(steps)
                if self.sync:
                    self.sync()
                items = steps * self.items_per_step
                self.wall[name].append(items / (time.perf_counter() - t0))
                self.cpu[name].append(items / max(time.process_time() - c0, 1e-9))
            if after_round:  # e.g. write the figures so far: a run stopped at its budget keeps them
                after_round(r)

    def median(self, cpu: bool = False) -> dict[str, float]:
        return {name: statistics.median(r) for name, r in (self.cpu if cpu else self.wall).items() if r}


def ratios(rates: dict[str, float], name: str, refs: tuple[str, ...], prefix: str = "vs_",
           applies: Callable[[str, str], bool] = lambda name, ref: True) -> dict[str, float]:
    """{prefix + ref: rates[name] / rates[ref]} for every reference measured, other than `name`."""
    return {f"{prefix}{ref}": round(rates[name] / rates[ref], 3) for ref in refs
            if ref in rates and ref != name and applies(name, ref)}


# ---------------------------------------------------------------------------------------------
# A process tree's CPU time and memory
# ---------------------------------------------------------------------------------------------
class TreeSampler:
    """CPU seconds and peak memory of a process and all its descendants (the CLI, the Ray it starts:
    GCS, raylet, workers), sampled on a thread every `period` s until stop(); a process that exits
    keeps its last CPU reading. Sampling this process itself leaves out the sampler's own CPU time.

    Memory: RSS double-counts pages shared between processes (libraries, the object store), so the
    proportional set size (PSS) is recorded too. Sampling must stay cheap on a 2-core machine (reading
    PSS of every process 4x a second cost a quarter of a core; RSS every 0.5 s still took 3% of a core
    from the run it measured): with memory only, RSS every period, the process list and PSS every
    `slow_every` periods. A streaming run's memory plateaus for tens of seconds, so the peak is not
    missed. With CPU time, the process list is read every period, so short-lived workers count."""

    def __init__(self, pid: int | None = None, period: float = 0.5, cpu: bool = True, memory: bool = False,
                 slow_every: int = 4):
        import psutil

        self.root = psutil.Process(pid)
        self.period, self.cpu, self.memory, self.slow_every = period, cpu, memory, slow_every
        self.samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        self.last: dict[tuple[int, float], float] = {}
        self.peak_rss = self.peak_pss = 0
        self._own = self.root.pid == os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        procs: list = []
        tick = 0
        while not self._stop.is_set():
            slow = tick % self.slow_every == 0
            if self.cpu or slow:
                try:
                    procs = [self.root] + self.root.children(recursive=True)
                except psutil.Error:
                    return
            rss = pss = 0
            for p in procs:
                try:
                    if self.cpu:
                        t = p.cpu_times()
                        self.last[(p.pid, p.create_time())] = t.user + t.system
                    if self.memory:
                        if slow:
                            info = p.memory_full_info()
                            pss += getattr(info, "pss", info.rss)
                        else:
                            info = p.memory_info()
                        rss += info.rss
                except psutil.Error:
                    pass
            if self.cpu:
                self.samples.append((time.time(), sum(self.last.values()) - (time.thread_time() if self._own else 0)))
            if self.memory:
                self.peak_rss = max(self.peak_rss, rss)
                if slow:
                    self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.period)

    def stop(self) -> "TreeSampler":
        self._stop.set()
        self._thread.join()
        return self

    @property
    def cpu_s(self) -> float:
        """CPU seconds at the last sample."""
        return self.samples[-1][1] if self.samples else 0.0

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds used between two times (time.time()), interpolated between samples."""
        return self._at(t1) - self._at(t0)

    def _at(self, when: float) -> float:
        ts = [t for t, _ in self.samples]
        i = bisect.bisect_left(ts, when)
        if i == 0:
            return self.samples[0][1]
        if i == len(ts):
            return self.samples[-1][1]
        (ta, ca), (tb, cb) = self.samples[i - 1], self.samples[i]
        return ca + (cb - ca) * (when - ta) / (tb - ta)


# ---------------------------------------------------------------------------------------------
# The CLI as a user runs it
# ---------------------------------------------------------------------------------------------
def run_cli(argv: list[str], log_path: str, **sampler) -> tuple[float, float, TreeSampler]:
    """`diffmix-ray ARGV` in its own process group with the private local Ray it starts (no dashboard,
    no address inherited), output to `log_path`, its process tree sampled (TreeSampler's options).
    Returns (start as time.time(), wall seconds, the sampler); exits naming the log if it failed. An
    interrupted benchmark takes the command and its Ray down with it."""
    ray_tmp = tempfile.mkdtemp(prefix="dmrb-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, DIFFMIX_RAY_DASHBOARD="0")
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        started = time.time()
        proc = subprocess.Popen([CLI, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        tree = TreeSampler(proc.pid, **sampler)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            wall = time.time() - started
            tree.stop()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        sys.exit(f"diffmix-ray {argv[0]} failed (exit {rc}); see {log_path}")
    return started, wall, tree


# ---------------------------------------------------------------------------------------------
# Devices and out-of-memory errors
# ---------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for the device (a no-op on a CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def describe_device(device) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (1 threads, 2 cores, load 3.1)'."""
    import torch

    if str(device).startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"


def device_label(device) -> str:
    """The device's part of a results file's name: 'cpu', or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return slug(torch.cuda.get_device_name(device))
    return slug(str(device).split(":")[0])


def ray_modules() -> list[str]:
    """The Ray modules imported so far (the GPU scripts must import none)."""
    return sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))


def is_oom(error: BaseException) -> bool:
    """An out-of-memory error of torch: torch.OutOfMemoryError (CUDA), or the RuntimeError older
    versions and the CPU allocator raise."""
    text = str(error)
    return type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def free_memory() -> None:
    """What a failed attempt held: collected, and the CUDA cache returned to the device."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def halving(measure: Callable[[int], object], batch: int, minimum: int = 1,
            note: Callable[[str], None] = print) -> tuple[object, int]:
    """measure(batch); after an out-of-memory error, measure(batch // 2) on a freed device, and so on
    until it fits (a batch that does not fit at `minimum` raises its error). Returns (what `measure`
    returned, the batch that fitted). Any other error is raised at once."""
    while True:
        try:
            return measure(batch), batch
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_oom(e) or batch <= minimum:
                raise
            note(f"out of memory at batch {batch} ({type(e).__name__}): trying batch {max(minimum, batch // 2)}")
        free_memory()  # outside the handler: the error's frames (and their tensors) are released by now
        batch = max(minimum, batch // 2)
