"""score benchmark: the same pairs, CLIP weights, batch size and threads, measured in one run.

CPU (default), three ways:
  (a) floor        the project's per-batch code in this process, without Ray: the CPU stage's decode and
                   resize (decode_pairs), the scoring actor's call, the cast to the scores schema
  (h) hand-written the reference's filter loop (scripts/filter_syn_data.py) extended to the same scores:
                   PIL decode, transformers' CLIP processor, CLIPModel forward with the prompts per batch
                   (once for the class prompts, once for the object prompts), the source images' features
  (b) system       `diffmix-ray score` in its own process, on the local Ray it starts, writing score files
and b/a (target >= 0.85), b/h.

--gpu: no Ray at all. The model work alone (pixels already decoded, as the actor receives them) for
clip-b32 (CLIP ViT-B/32's architecture, random weights) at batch 256 in fp16: the actor's call vs the
hand-written forward, images/s, FLOPs per pair, peak memory; and the CPU stage's decode + resize
rate per core, to size the CPU workers a GPU needs.

    .venv/bin/python bench/bench_score.py                     # clip-b32, 256 pairs, batch 16, 1 thread
    .venv/bin/python bench/bench_score.py --clip tiny --pairs 512   # the pipeline's own cost (model ~free)
    python bench/bench_score.py --gpu                         # one GPU; needs torch + transformers, no Ray
Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from _score_parts import CLASSES, SIZE, HandWritten, TreeCPU, load_pairs, make_inputs  # beside this file

CLI = os.path.join(os.path.dirname(sys.executable), "diffmix-ray")


def rates(seconds: list[float], images: list[int]) -> dict:
    """images/s over all intervals, in steady state (all but the first) and the median interval."""
    total = sum(images) / sum(seconds)
    steady = sum(images[1:]) / sum(seconds[1:]) if len(seconds) > 1 else total
    per = sorted(n / s for n, s in zip(images[1:], seconds[1:])) or [total]
    return {"images_per_s": total, "steady_images_per_s": steady, "median_images_per_s": per[len(per) // 2]}


# ---------------------------------------------------------------------------------------------
# (a) floor and (h) hand-written, in this process
# ---------------------------------------------------------------------------------------------
def floor_loop(scorer, rows, sources, batch_size: int, prep: dict) -> dict:
    from diffmix_ray.score.cpu_stages import decode_pairs, finish_scores

    seconds, counts, cpu = [], [], []
    for i in range(0, len(rows), batch_size):
        b = rows[i:i + batch_size]
        t, c = time.perf_counter(), time.process_time()
        keys = {"pair_id": np.array([r["pair_id"] for r in b], dtype=object),
                "source_id": np.array([r["source_id"] for r in b], dtype=object),
                "source_label": np.array([r["source_label"] for r in b]),
                "target_label": np.array([r["target_label"] for r in b]), "_src_file": np.zeros(len(b), np.int32)}
        batch = decode_pairs(keys, [r["image"] for r in b], [sources[r["source_id"]] for r in b],
                             np.ones(len(b), bool), prep, None)
        finish_scores(scorer(batch), None)
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        counts.append(len(b))
    return rates(seconds, counts) | {"per_cpu_s": sum(counts[1:]) / max(sum(cpu[1:]), 1e-9)}


def hand_loop(hand, rows, sources, batch_size: int) -> dict:
    seconds, counts = [], []
    for i in range(0, len(rows), batch_size):
        t = time.perf_counter()
        hand(rows[i:i + batch_size], sources)
        seconds.append(time.perf_counter() - t)
        counts.append(len(rows[i:i + batch_size]))
    return rates(seconds, counts)


# ---------------------------------------------------------------------------------------------
# (b) the system, as a user runs it
# ---------------------------------------------------------------------------------------------
def system_run(args, synthetic: str, name: str) -> dict:
    """`diffmix-ray score` on `synthetic` as a user runs it. With score files of 2 batches (the default
    here) a block is 2 batches, and the files' times give a timeline, as in bench_generate.py."""
    import pyarrow.parquet as pq

    ray_tmp = tempfile.mkdtemp(prefix="dmrs-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, DIFFMIX_RAY_DASHBOARD="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [CLI, "score", "--synthetic", synthetic, "--clip", args.clip, "--name", name, "--batch-size",
           str(args.batch_size), "--cpus-per-actor", str(args.threads), "--rows-per-file", str(args.rows_per_file)]
    log = os.path.join(os.path.dirname(synthetic), f"{name}.log")
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        cpu = TreeCPU(proc.pid)
        rc = proc.wait()
        cpu.stop()
    wall = time.time() - started
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        sys.exit(f"{name}: diffmix-ray score failed (exit {rc}); see {log}")
    out = os.path.join(synthetic, "scores", name)
    files = sorted((os.path.getmtime(os.path.join(out, n)), pq.read_metadata(os.path.join(out, n)).num_rows)
                   for n in os.listdir(out) if n.endswith(".parquet"))
    writes: list[list[float]] = []  # one write task writes its files together: group files 0.2 s apart
    for t, n in files:
        if writes and t - writes[-1][0] < 0.2:
            writes[-1][1] += n
        else:
            writes.append([t, n])
    times = [t for t, _ in writes]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    r = {"pairs": manifest["counts"]["scored"], "wall_s": wall, "writes": len(writes), "cpu_s": cpu.samples[-1][1],
         "first_file_s": times[0] - started, "score_s": manifest["timings"]["score_s"]}
    if len(writes) >= 4:
        # The first write also waits for its worker's start (imports), which would shorten the next
        # interval: the timeline starts at the second write.
        rows = [n for _, n in writes[2:]]
        per = sorted(n / (b - a) for n, a, b in zip(rows, times[1:], times[2:]))
        r |= {"steady_images_per_s": sum(rows) / (times[-1] - times[1]), "median_images_per_s": per[len(per) // 2]}
    return r


def system(args, synthetic: str) -> dict:
    """(b) on a quarter of the pairs, then on all of them, each a fresh `diffmix-ray score`. The
    timeline of the full run gives the steady rate; the differences between the runs (pairs, CPU
    seconds of every process, wall) give what each further pair costs, start-up cancelled out."""
    small = system_run(args, synthetic + "-quarter", "bench")
    full = system_run(args, synthetic, "bench")
    more = full["pairs"] - small["pairs"]
    return full | {"small": small, "per_cpu_s": more / max(full["cpu_s"] - small["cpu_s"], 1e-9),
                   "marginal_per_s": more / max(full["wall_s"] - small["wall_s"], 1e-9)}


def fmt(r: dict) -> str:
    cpu = f", {r['per_cpu_s']:.2f} per CPU second" if "per_cpu_s" in r else ""
    return f"{r['steady_images_per_s']:.2f} pairs/s steady (median {r['median_images_per_s']:.2f}{cpu})"


def cpu_main(args) -> None:
    import dataclasses

    import torch

    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.score.scorer import Scorer

    work = args.work or tempfile.mkdtemp(prefix="bench-score-")
    try:
        # Shards as large as (b)'s blocks: each block reads exactly one shard.
        synthetic = make_inputs(work, max(CLASSES, args.pairs // args.per_image), args.per_image, args.rows_per_file)
        rows, sources, info = load_pairs(synthetic)
        print(f"{len(rows)} pairs ({args.per_image} per source, {SIZE[0]}x{SIZE[1]} JPEGs), --clip {args.clip}, "
              f"batch {args.batch_size}, {args.threads} thread(s); machine: {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        prep = dataclasses.asdict(resolve_clip(args.clip).prep)
        torch.set_num_threads(args.threads)
        scorer = Scorer(args.clip, info.classes, info.super_class, threads=args.threads)
        hand = HandWritten(args.clip, info)
        a1 = floor_loop(scorer, rows, sources, args.batch_size, prep)
        h = hand_loop(hand, rows[:4 * args.batch_size], sources, args.batch_size)  # slow: 4 batches tell its rate
        print(f"(a) floor:        {fmt(a1)}", flush=True)
        print(f"(h) hand-written: {fmt(h)}", flush=True)
        b = system(args, synthetic)
        a2 = floor_loop(scorer, rows, sources, args.batch_size, prep)  # again: a neighbour's load drifts
        print(f"(a) again:        {fmt(a2)}", flush=True)
        a = {k: (a1[k] + a2[k]) / 2 for k in ("steady_images_per_s", "median_images_per_s", "per_cpu_s")}
        print(f"(b) system:       {fmt(b)}; {b['pairs']} pairs: wall {b['wall_s']:.1f} s, first score file at "
              f"{b['first_file_s']:.1f} s, {b['writes']} writes; {b['small']['pairs']} pairs: wall "
              f"{b['small']['wall_s']:.1f} s; the extra pairs: {b['marginal_per_s']:.2f} pairs/s", flush=True)
        for name, ref, target in (("b/a", a, " (target >= 0.85)"), ("b/h", h, "")):
            print(f"{name} steady = {b['steady_images_per_s'] / ref['steady_images_per_s']:.2f}, median = "
                  f"{b['median_images_per_s'] / ref['median_images_per_s']:.2f}{target}")
        print(f"per CPU second: b/a = {b['per_cpu_s'] / a['per_cpu_s']:.2f} ((b): every process of the run, the "
              f"extra pairs over the extra CPU seconds)")
        print(f"end to end: {b['pairs'] / b['wall_s']:.2f} pairs/s over (b)'s whole wall time (Python, Ray and "
              "actor start-up included)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def gpu_main(args) -> None:
    from bench_score_gpu import run_gpu  # beside this file: the model-only measurement

    run_gpu(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="model work only, no Ray (default device cuda)")
    p.add_argument("--device", default=None, help="--gpu: cuda (default) | cpu (to try the script here)")
    p.add_argument("--clip", default=None, help="CLIP spec (default clip-b32)")
    p.add_argument("--pairs", type=int, default=None, help="pairs (default 256)")
    p.add_argument("--per-image", type=int, default=4, help="pairs per source image")
    p.add_argument("--batch-size", type=int, default=None, help="default 16; --gpu 256")
    p.add_argument("--batches", type=int, default=20, help="--gpu: timed batches")
    p.add_argument("--classes", type=int, default=200, help="--gpu: class prompts (CUB: 200)")
    p.add_argument("--rows-per-file", type=int, default=None, help="(b)'s score files and blocks (default 2 "
                   "batches: a timeline; a real run has ~1024-row blocks)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in (a)/(h); CPUs of the actor in (b)")
    p.add_argument("--work", default=None, help="working folder (default: a temp folder, deleted after)")
    p.add_argument("--json", default=None, help="--gpu: write the figures here as they are measured")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.clip = args.clip or "clip-b32"
    args.batch_size = args.batch_size or (256 if args.gpu else 16)
    args.pairs = args.pairs or 256
    args.rows_per_file = args.rows_per_file or 2 * args.batch_size
    gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
