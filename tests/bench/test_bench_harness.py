"""bench/_harness.py: the rates, rounds, samplers, out-of-memory halving and results file every
benchmark is built on (no Ray, no model)."""

from __future__ import annotations

import contextlib

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests import paths

REPO = str(paths.REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import _harness as h  # noqa: E402  (bench/ is not a package)


# ---------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------
def test_rates_leave_the_warm_up_out_of_the_steady_rate_and_take_the_median_interval():
    r = h.rates([10.0, 1.0, 2.0, 1.0], [4, 4, 4, 4])  # a slow first batch, then 4, 2 and 4 images/s
    assert r["images"] == 16 and r["seconds"] == 14.0
    assert r["images_per_s"] == pytest.approx(16 / 14)
    assert r["steady_images_per_s"] == pytest.approx(12 / 4)
    assert r["median_images_per_s"] == 4.0  # of 2, 4, 4
    none_left_out = h.rates([10.0, 1.0], [4, 4], warmup=0)
    assert none_left_out["steady_images_per_s"] == none_left_out["images_per_s"] == pytest.approx(8 / 11)
    one = h.rates([2.0], [4])  # nothing after the warm-up: the steady rate is the whole run's
    assert one["steady_images_per_s"] == one["median_images_per_s"] == 2.0
    empty = h.rates([], [])
    assert empty["images"] == 0 and empty["steady_images_per_s"] != empty["steady_images_per_s"]  # NaN


def test_compare_prints_and_records_the_steady_and_median_ratios(capsys):
    results = h.Results(None)
    h.compare(results, "b/a", {"steady_images_per_s": 9.0, "median_images_per_s": 8.0},
              {"steady_images_per_s": 10.0, "median_images_per_s": 10.0}, " (target >= 0.85)")
    assert capsys.readouterr().out == "b/a steady = 0.90, median = 0.80 (target >= 0.85)\n"
    assert results.data == {"ratios": {"b/a": {"steady": 0.9, "median": 0.8}}}
    assert h.rounded({"a": 1 / 3, "n": 4, "small": {"b": 2 / 3}}) == {"a": 0.333, "n": 4, "small": {"b": 0.667}}


def write_parquet(folder, name: str, rows: int, mtime: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(folder, name)
    pq.write_table(pa.table({"x": list(range(rows))}), path)
    os.utime(path, (mtime, mtime))


def test_writes_group_the_files_of_one_write_and_timeline_reads_the_rates_from_them(tmp_path):
    t0 = 1_000_000.0
    for name, rows, at in (("a.parquet", 8, t0 + 5.0), ("b.parquet", 4, t0 + 7.0), ("c.parquet", 4, t0 + 7.1),
                           ("d.parquet", 8, t0 + 8.0), ("e.parquet", 8, t0 + 10.0)):
        write_parquet(tmp_path, name, rows, at)
    (tmp_path / "manifest.json").write_text("{}")  # not a parquet file: not a write
    done = h.writes(str(tmp_path))
    assert [(round(t - t0, 1), n) for t, n in done] == [(5.0, 8), (7.0, 8), (8.0, 8), (10.0, 8)]

    r = h.timeline(done, started=t0, wall=12.0)
    assert r["images"] == 32 and r["writes"] == 4
    assert r["steady_images_per_s"] == pytest.approx(24 / 5.0)  # the rows of writes 2-4 over 5 s
    assert r["median_images_per_s"] == pytest.approx(8 / 2.0)  # of 4, 8 and 4 rows/s
    assert r["first_write_s"] == pytest.approx(5.0)
    assert r["startup_s"] == pytest.approx(5.0 - 8 / (24 / 5.0))  # the first write's rows at the steady rate
    assert r["after_last_write_s"] == pytest.approx(2.0)
    later = h.timeline(done, started=t0, wall=12.0, skip=1)  # from the second write on
    assert later["steady_images_per_s"] == pytest.approx(16 / 3.0)
    assert later["images"] == 32


# ---------------------------------------------------------------------------------------------
# Warm-up and rounds
# ---------------------------------------------------------------------------------------------
def test_rounds_run_the_variants_in_turn_and_rate_items_per_wall_and_cpu_second():
    calls, layouts, rounds_done = [], [], []

    def variant(name, busy_s):
        def run(steps):
            calls.append((name, steps))
            end = time.process_time() + busy_s  # CPU work: this process's CPU time advances
            while time.process_time() < end:
                pass
        return run

    r = h.Rounds({"a": variant("a", 0.02), "b": variant("b", 0.04)}, items_per_step=8, before=layouts.append)
    r.run(3, 2, after_round=rounds_done.append)
    assert calls == [("a", 2), ("b", 2)] * 3
    assert layouts == ["a", "b"] * 3 and rounds_done == [0, 1, 2]
    assert sorted(r.wall) == ["a", "b"] and all(len(v) == 3 for v in r.wall.values())
    for name, busy in (("a", 0.02), ("b", 0.04)):  # 16 items per round, at most the CPU time's rate
        assert all(0 < rate <= 16 / busy * 1.01 for rate in r.cpu[name])
        assert r.median()[name] == sorted(r.wall[name])[1]
    ratio = h.ratios(r.median(cpu=True), "b", ("a", "b"))
    assert list(ratio) == ["vs_a"] and ratio["vs_a"] < 1  # b does twice a's work per round
    assert h.ratios({"x": 2.0, "y": 4.0}, "x", ("y",), prefix="cpu_vs_", applies=lambda n, ref: False) == {}


def test_timed_waits_for_the_device():
    order = []
    seconds = h.timed(lambda: order.append("work"), sync=lambda: order.append("sync"))
    assert order == ["work", "sync"] and seconds >= 0


# ---------------------------------------------------------------------------------------------
# Out-of-memory errors: the batch is halved until it fits
# ---------------------------------------------------------------------------------------------
class OutOfMemoryError(RuntimeError):  # what torch.OutOfMemoryError is called
    pass


def test_halving_halves_the_batch_after_an_out_of_memory_error_until_it_fits():
    tried, notes = [], []

    def measure(batch):
        tried.append(batch)
        if batch > 12:
            raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        return f"figures at {batch}"

    assert h.halving(measure, 64, note=notes.append) == ("figures at 8", 8)
    assert tried == [64, 32, 16, 8]
    assert notes[0] == "out of memory at batch 64 (OutOfMemoryError): trying batch 32" and len(notes) == 3
    tried.clear()
    assert h.halving(measure, 12, note=notes.append) == ("figures at 12", 12) and tried == [12]


def test_halving_raises_other_errors_at_once_and_an_oom_at_the_smallest_batch():
    tried = []

    def broken(batch):
        tried.append(batch)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        h.halving(broken, 64, note=lambda line: None)
    assert tried == [64]

    def never_fits(batch):
        tried.append(batch)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    tried.clear()
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        h.halving(never_fits, 6, minimum=2, note=lambda line: None)
    assert tried == [6, 3, 2]


def test_is_oom_knows_torchs_out_of_memory_error():
    import torch

    assert h.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert h.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not h.is_oom(RuntimeError("shape mismatch")) and not h.is_oom(MemoryError())


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------
def make_bench():
    bench = h.Bench("demo", "A demo benchmark.\n\nMore text.")
    bench.parser.add_argument("--pairs", type=int, default=96)
    bench.parser.add_argument("--clip", default="clip-b32")
    bench.parser.add_argument("--quick", action="store_true")
    bench.parser.add_argument("--work", default=None)
    return bench


def test_config_name_says_which_flags_differ_from_their_defaults():
    bench = make_bench()
    bench.parse([])
    assert bench.config == "default"
    bench.parse(["--pairs", "8", "--clip", "Tiny/Model", "--quick", "--work", "/tmp/x", "--json", "/tmp/y.json"])
    assert bench.config == "pairs=8_clip=tiny-model_quick"  # where it writes is not part of the setting
    bench.parser.add_argument("--variants", default=None)
    bench.parse(["--variants", ",".join(f"variant-{i}" for i in range(30))])
    assert len(bench.config) == 89 and bench.config.startswith("variants=variant-0,variant-1")


def test_pick_reads_a_list_of_names_and_stops_at_an_unknown_one(capsys):
    bench = make_bench()
    assert bench.pick("--variants", None, ("a", "b", "c"), ["a", "b"]) == ["a", "b"]
    assert bench.pick("--variants", "c, a", ("a", "b", "c"), ["a"]) == ["c", "a"]
    with pytest.raises(SystemExit):
        bench.pick("--variants", "a,z", ("a", "b"), ["a"])
    assert "--variants: unknown ['z']; choose from a, b" in capsys.readouterr().err


def test_results_are_written_as_measured_and_the_run_is_recorded_however_it_ends(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(h, "RESULTS_DIR", str(tmp_path / "results"))
    path = tmp_path / "results" / "demo-cpu-pairs=8.json"
    seen = []

    def measure(args, results):
        results.update(first={"images_per_s": 1.5})
        seen.append(json.loads(path.read_text()))  # on disk before the next figure is measured
        results.add("rows", "second", 2)
        raise RuntimeError("stopped half-way")

    with pytest.raises(RuntimeError):
        make_bench().main(measure, "cpu", argv=["--pairs", "8"])
    assert seen[0]["first"] == {"images_per_s": 1.5} and seen[0]["run"]["bench"] == "demo"
    saved = json.loads(path.read_text())
    assert saved["first"] == {"images_per_s": 1.5} and saved["rows"] == {"second": 2}
    assert saved["run"]["status"] == "error: RuntimeError: stopped half-way"
    assert saved["run"]["config"] == "pairs=8" and saved["run"]["args"]["pairs"] == 8 and "wall_s" in saved
    assert capsys.readouterr().out.strip().endswith(f"figures: {path}")
    assert sorted(os.listdir(tmp_path / "results")) == ["demo-cpu-pairs=8.json"]  # no temporary file left

    def fails(args, results):
        results.update(failed_pairs=3)
        sys.exit(1)

    chosen = tmp_path / "part.json"
    with pytest.raises(SystemExit):
        make_bench().main(fails, lambda args: "NVIDIA H100 80GB HBM3", argv=["--json", str(chosen)])
    saved = json.loads(chosen.read_text())
    assert saved["failed_pairs"] == 3 and saved["run"]["status"] == "exit 1"
    assert saved["run"]["device"] == "NVIDIA H100 80GB HBM3"
    bench = make_bench()
    bench.parse([])
    assert bench.path("NVIDIA H100 80GB HBM3") == str(tmp_path / "results" / "demo-nvidia-h100-80gb-hbm3-default.json")


def test_a_bench_killed_at_its_budget_leaves_its_figures(tmp_path):
    """What gpu_session.run_part relies on: the figures measured before the kill are in the file."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(REPO, 'bench')!r})
        from _harness import Bench
        def measure(args, results):
            results.update(measured=1)
            print("measured", flush=True)
            time.sleep(60)
        Bench("slow", "Sleeps.").main(measure)
    """)
    out = tmp_path / "slow.json"
    proc = subprocess.Popen([sys.executable, "-c", script, "--json", str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "measured"
    proc.kill()
    proc.wait()
    assert json.loads(out.read_text())["measured"] == 1


# ---------------------------------------------------------------------------------------------
# The process-tree sampler
# ---------------------------------------------------------------------------------------------
def test_tree_sampler_counts_a_childs_cpu_time_and_memory_after_it_exits():
    child = textwrap.dedent("""
        import time
        held = bytearray(200 * 2**20)  # touched below: resident
        for i in range(0, len(held), 4096):
            held[i] = 1
        end = time.process_time() + 0.6
        while time.process_time() < end:
            pass
        time.sleep(1.0)
    """)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, "
                                                     f"'-c', {child!r}])"])
    tree = h.TreeSampler(parent.pid, period=0.1, memory=True, slow_every=2)
    parent.wait()
    time.sleep(0.3)
    tree.stop()
    assert tree.cpu_s >= 0.6  # the grandchild's CPU, kept after it exited
    assert tree.peak_rss >= 200 * 2**20 and tree.peak_pss >= 200 * 2**20


def _descendants_cpu_s() -> float:
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def test_tree_sampler_of_this_process_and_cpu_time_between_two_moments():
    tree = h.TreeSampler(period=0.05)
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    time.sleep(0.2)  # a few samples after the work
    tree.stop()
    # The sampler's own thread left out; the descendants' CPU counts (a Ray the test session started
    # earlier is among them), so the bound adds theirs since they started.
    assert 0.3 <= tree.cpu_s <= time.process_time() + _descendants_cpu_s()
    tree.samples = [(100.0, 1.0), (110.0, 3.0)]
    assert tree.between(100.0, 105.0) == pytest.approx(1.0)  # interpolated between samples
    assert tree.between(90.0, 120.0) == pytest.approx(2.0)  # outside them: the first and last readings
