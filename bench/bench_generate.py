"""generate benchmark: the same pairs, model, batch size and threads, measured in one run, three ways:

  (a) floor      a bare single-process diffusers img2img loop (decode, translate, JPEG in memory)
  (b) system     `diffmix-ray generate` in its own process, on the local Ray it starts, writing shards
  (c) reference  the reference code's loop: batch 1, one PNG file per image

then (b) again with 10x the pairs, to compare peak memory (the pipeline must stream).

    .venv/bin/python bench/bench_generate.py [--pairs 96] [--steps 10] [--batch-size 4] [--threads 2]

Prints figures; asserts nothing. Targets: b/a >= 0.85 (steady state), b/c >= 3, memory 10x/1x <= 1.2.
See bench/README.md for what each figure means."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

CLI = os.path.join(os.path.dirname(sys.executable), "diffmix-ray")
CLASSES = 4
IMAGE_SIZE = 128  # the bench model's resolution: no resize anywhere, in any of the three loops


# ---------------------------------------------------------------------------------------------
# Inputs: one dataset, one model folder, one plan, shared by (a), (b) and (c)
# ---------------------------------------------------------------------------------------------
def make_inputs(work: str, train_images: int) -> tuple[str, str]:
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder
    from diffmix_ray.models.loader import write_model

    raw = write_sample_imagefolder(os.path.join(work, "raw"), num_classes=CLASSES,
                                   per_class=train_images // CLASSES, size=IMAGE_SIZE)
    dataset = os.path.join(work, "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=SAMPLE_SUPER_CLASS, val_fraction=0.0), dataset,
            show_progress=False)
    model = write_model("bench:0", os.path.join(work, "model"))
    return dataset, model


def gen_config(args, dataset: str, model: str, out: str, multiplier: float):
    from diffmix_ray.generate.config import GenerateConfig

    return GenerateConfig(dataset=dataset, model=model, out=out, mode="real-mix", multiplier=multiplier,
                          steps=args.steps, batch_size=args.batch_size, max_actors=1,
                          cpus_per_actor=float(args.threads), rows_per_shard=2 * args.batch_size)


def planned_pairs(cfg) -> list[dict]:
    """The plan `generate` makes for `cfg`, each row with its source image bytes and prompt."""
    from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID
    from diffmix_ray.generate.run import build_plan, resolve_inputs

    inputs = resolve_inputs(cfg)
    info = inputs.dataset.info
    train = inputs.dataset.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE])
    images = dict(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist()))
    rows = build_plan(inputs).to_pylist()
    for r in rows:
        r["source"] = images[r["source_id"]]
        r["prompt"] = f"a photo of a {info.classes[r['target_label']]} {info.super_class}"
        r["target_name"] = info.classes[r["target_label"]]
        r["source_name"] = info.classes[r["source_label"]]
    return rows


def load_pipe(model: str, threads: int):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the translation actor does on CPU (denormals are ~10x slower)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rates(seconds: list[float], images: list[int]) -> dict:
    """images/s from consecutive intervals (seconds[i] produced images[i]): over all of them, in
    steady state (all but the first, which warms up), and the median of the steady intervals'
    rates, which a busy neighbour on a shared machine disturbs least."""
    total = sum(images) / sum(seconds)
    steady = sum(images[1:]) / sum(seconds[1:]) if len(seconds) > 1 else total
    per = sorted(n / s for n, s in zip(images[1:], seconds[1:])) or [total]
    return {"images": sum(images), "seconds": sum(seconds), "images_per_s": total,
            "steady_images_per_s": steady, "median_images_per_s": per[len(per) // 2]}


# ---------------------------------------------------------------------------------------------
# (a) the compute floor and (c) the reference-style loop, in this process
# ---------------------------------------------------------------------------------------------
def floor_loop(pipe, pairs: list[dict], args) -> dict:
    import torch
    from PIL import Image

    seconds, sizes = [], []
    for i in range(0, len(pairs), args.batch_size):
        batch = pairs[i:i + args.batch_size]
        t = time.perf_counter()
        images = [Image.open(io.BytesIO(r["source"])).convert("RGB") for r in batch]
        with torch.inference_mode():
            out = pipe(prompt=[r["prompt"] for r in batch], image=images, strength=float(batch[0]["strength"]),
                       num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                       generator=[torch.Generator().manual_seed(int(r["seed"])) for r in batch]).images
        for arr in out:
            buf = io.BytesIO()
            Image.fromarray((arr * 255).round().astype("uint8")).save(buf, format="JPEG", quality=95)
        seconds.append(time.perf_counter() - t)
        sizes.append(len(batch))
    return rates(seconds, sizes)


def reference_loop(pipe, pairs: list[dict], args, out_dir: str) -> dict:
    """As Diff-Mix's sample_mp.py: one pair per call, source read and resized per image, the
    output resized back and saved as its own PNG under data/<source>/<target>-<idx>-<s>.png."""
    import torch
    from PIL import Image

    seconds = []
    for idx, r in enumerate(pairs):
        t = time.perf_counter()
        source = Image.open(io.BytesIO(r["source"])).convert("RGB")
        with torch.inference_mode():
            img = pipe(prompt=r["prompt"], image=source.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR),
                       strength=float(r["strength"]), num_inference_steps=args.steps, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(int(r["seed"]))).images[0]
        folder = os.path.join(out_dir, "data", r["source_name"].replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        img.resize(source.size).save(os.path.join(
            folder, f"{r['target_name'].replace(' ', '_')}-{idx:06d}-{r['strength']:.1f}.png"))
        seconds.append(time.perf_counter() - t)
    return rates(seconds, [1] * len(seconds))


# ---------------------------------------------------------------------------------------------
# (b) the system, as a user runs it: the CLI in its own process with its own local Ray
# ---------------------------------------------------------------------------------------------
class TreeMemory:
    """Peak memory of a process and all its descendants (the Ray it starts: GCS, raylet, workers).
    RSS double-counts pages shared between processes (libraries, the object store), so the
    proportional set size (PSS) is recorded too. Sampling must stay cheap on a 2-core machine
    (reading PSS of every process 4x a second cost a quarter of a core; RSS every 0.5 s still took
    3% of a core from the run it measured): RSS every second; the process list and PSS every 4 s.
    A streaming run's memory plateaus for tens of seconds, so the peak is not missed."""

    def __init__(self, pid: int, period: float = 1.0, slow_every: int = 4):
        self.root, self.period, self.slow_every = psutil.Process(pid), period, slow_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        tick = 0
        while not self._stop.is_set():
            slow = tick % self.slow_every == 0
            if slow:
                try:
                    procs = [self.root] + self.root.children(recursive=True)
                except psutil.Error:
                    return
            rss = pss = 0
            for p in procs:
                try:
                    if slow:
                        info = p.memory_full_info()
                        pss += getattr(info, "pss", info.rss)
                    else:
                        info = p.memory_info()
                    rss += info.rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            if slow:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def system_run(cfg, work: str, name: str) -> dict:
    """`diffmix-ray generate` for `cfg`; its timeline is read from the shard files' mtimes (a
    shard holds 2 batches), its memory sampled over its whole process tree."""
    out = os.path.join(work, name)
    ray_tmp = tempfile.mkdtemp(prefix="dmrb-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, DIFFMIX_RAY_DASHBOARD="0")
    env.pop("RAY_ADDRESS", None)
    args = [CLI, "generate", "--dataset", cfg.dataset, "--model", cfg.model, "--out", out, "--mode", cfg.mode,
            "--multiplier", str(cfg.multiplier), "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--max-actors", "1", "--cpus-per-actor", str(cfg.cpus_per_actor),
            "--rows-per-shard", str(cfg.rows_per_shard), "--strength", str(cfg.strength)]
    for flag, value in (("--concepts", cfg.concepts), ("--limit", cfg.limit), ("--gpus-per-actor", cfg.gpus_per_actor)):
        if value is not None:
            args += [flag, str(value)]
    log_path = os.path.join(work, f"{name}.log")
    with open(log_path, "w") as log:
        started = time.time()
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        memory = TreeMemory(proc.pid)
        try:
            rc = proc.wait()
        finally:  # interrupted: take the command and the Ray it started down with us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            wall = time.time() - started
            memory.stop()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        sys.exit(f"{name}: diffmix-ray generate failed (exit {rc}); see {log_path}")
    import pyarrow.parquet as pq

    shards_dir = os.path.join(out, "shards")
    files = sorted((os.path.getmtime(os.path.join(shards_dir, n)), pq.read_metadata(os.path.join(shards_dir, n)).num_rows)
                   for n in os.listdir(shards_dir) if n.endswith(".parquet"))
    # One write task writes all files of one output block at once: group files 0.2 s apart.
    writes: list[list[float]] = []
    for t, rows in files:
        if writes and t - writes[-1][0] < 0.2:
            writes[-1][1] += rows
        else:
            writes.append([t, rows])
    times = [t for t, _ in writes]
    intervals = [writes[0][1]] + [rows for _, rows in writes[1:]]
    r = rates([1.0] + [b - a for a, b in zip(times, times[1:])], intervals)  # the first is a placeholder
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return {"images": r["images"], "wall_s": wall, "writes": len(writes),
            "steady_images_per_s": r["steady_images_per_s"], "median_images_per_s": r["median_images_per_s"],
            "first_shard_s": times[0] - started,
            # when the actor began translating: the first write minus the time its rows took
            "startup_s": times[0] - started - writes[0][1] / r["steady_images_per_s"],
            "after_last_shard_s": started + wall - times[-1],  # verify, manifest, _SUCCESS, Ray shutdown
            "manifest_images_per_s": manifest["timings"]["images_per_s"],
            "peak_rss_gib": memory.peak_rss / 2**30, "peak_pss_gib": memory.peak_pss / 2**30}


def fmt(r: dict) -> str:
    return f"{r['steady_images_per_s']:.2f} images/s steady (median {r['median_images_per_s']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=96, help="pairs of the base run (2 per train image)")
    parser.add_argument("--scale", type=int, default=10, help="the memory run has scale x pairs (0: skip it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in (a)/(c); CPUs of the actor in (b)")
    parser.add_argument("--work", default=None, help="working folder (default: a temp folder, deleted after)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = args.work or tempfile.mkdtemp(prefix="bench-gen-")
    os.makedirs(work, exist_ok=True)
    try:
        dataset, model = make_inputs(work, train_images=max(CLASSES, args.pairs // 2))
        base = gen_config(args, dataset, model, os.path.join(work, "b"), multiplier=2.0)
        pairs = planned_pairs(base)
        print(f"{len(pairs)} pairs, bench model ({IMAGE_SIZE} px), {args.steps} steps, batch {args.batch_size}, "
              f"{args.threads} threads; machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)

        t = time.perf_counter()
        pipe = load_pipe(model, args.threads)
        load_s = time.perf_counter() - t
        a = floor_loop(pipe, pairs, args)
        print(f"(a) floor:     {fmt(a)}; all batches {a['images_per_s']:.2f}; model load {load_s:.1f} s", flush=True)
        c = reference_loop(pipe, pairs, args, os.path.join(work, "c"))
        print(f"(c) reference: {fmt(c)}; all images {c['images_per_s']:.2f}", flush=True)
        del pipe

        b = system_run(base, work, "b")
        # (a) again, after (b): a busy neighbour's load drifts; both figures show how much.
        pipe = load_pipe(model, args.threads)
        a2 = floor_loop(pipe, pairs, args)
        del pipe
        print(f"(a) again:     {fmt(a2)}", flush=True)
        a = {k: (a[k] + a2[k]) / 2 for k in ("steady_images_per_s", "median_images_per_s")}
        print(f"(b) system:    {fmt(b)}; wall {b['wall_s']:.1f} s = start-up {b['startup_s']:.1f} s (first shard at "
              f"{b['first_shard_s']:.1f} s) + translation + {b['after_last_shard_s']:.1f} s after the last shard; "
              f"manifest {b['manifest_images_per_s']:.2f} images/s incl. actor start; "
              f"peak RSS {b['peak_rss_gib']:.2f} GiB, PSS {b['peak_pss_gib']:.2f} GiB", flush=True)

        for name, ref, target in (("b/a", a, "0.85"), ("b/c", c, "3")):  # a: the mean of its two runs
            print(f"{name} steady = {b['steady_images_per_s'] / ref['steady_images_per_s']:.2f}, median = "
                  f"{b['median_images_per_s'] / ref['median_images_per_s']:.2f}   (target >= {target})")
        print(f"c/b end to end (c's loop + model load vs b's wall incl. Ray and actor start) = "
              f"{(c['seconds'] + load_s) / b['wall_s']:.2f}")
        if args.scale:
            big = system_run(gen_config(args, dataset, model, os.path.join(work, "b10"), 2.0 * args.scale),
                             work, "b10")
            print(f"(b) x{args.scale}:      {big['images']} images, {fmt(big)}, wall {big['wall_s']:.1f} s; "
                  f"peak RSS {big['peak_rss_gib']:.2f} GiB, PSS {big['peak_pss_gib']:.2f} GiB")
            print(f"memory x{args.scale}/x1: RSS {big['peak_rss_gib'] / b['peak_rss_gib']:.2f}, "
                  f"PSS {big['peak_pss_gib'] / b['peak_pss_gib']:.2f}   (target <= 1.2)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
