"""score benchmark: the same pairs, CLIP weights, batch size and threads, measured in one run.

CPU (default), three ways:
  (a) floor        the project's per-batch code in this process, without Ray: the CPU stage's decode and
                   resize (decode_pairs), the scoring actor's call, the cast to the scores schema
  (h) hand-written the reference's filter loop (scripts/filter_syn_data.py) extended to the same scores:
                   PIL decode, transformers' CLIP processor, CLIPModel forward with the prompts per batch
                   (once for the class prompts, once for the object prompts), the source images' features
  (b) system       `diffmix-ray score` in its own process, on the local Ray it starts, writing score files
and b/a (target >= 0.85), b/h.

--gpu: no Ray at all. The model work alone (pixels already decoded and cropped, as the CPU stage hands
them to the actor; each source serves --per-image pairs) for clip-b32 (CLIP ViT-B/32's architecture,
random weights) at batch 256 in fp16:
  actor         Scorer.__call__: uint8 batch to the device, normalisation, one image-tower pass for the
                synthetic images and one for their distinct sources, every score, one copy back
  hand-written  (h)'s model part: CLIPModel forward with the class prompts and again with the object
                prompts (text encoded per batch), image features of every pair's source (no sharing)
images/s, FLOPs per pair (torch's FlopCounterMode), peak memory, NaN scores (random fp16 weights may
overflow), and the CPU stage's decode + resize rate on one core (500x375 JPEGs), which says how many
CPU workers keep one GPU busy. A batch that runs out of device memory is halved until it fits.

    .venv/bin/python bench/bench_score.py                     # clip-b32, 256 pairs, batch 16, 1 thread
    .venv/bin/python bench/bench_score.py --clip tiny --pairs 512   # the pipeline's own cost (model ~free)
    python bench/bench_score.py --gpu                         # one GPU; needs torch + transformers, no Ray
Prints figures and writes them to bench/results/ (--json); asserts nothing."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

from _harness import (Bench, compare, device_label, halving, rates, rounded, run_cli, timed, timeline,  # bench/
                      workdir, writes)
from _score_parts import CLASSES, SIZE, HandWritten, load_pairs, make_inputs

bench = Bench("score", __doc__)
p = bench.parser
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


def device_of(args) -> str:
    """Fills in the defaults that depend on the mode; the device's label for the results file."""
    args.clip = args.clip or "clip-b32"
    args.batch_size = args.batch_size or (256 if args.gpu else 16)
    args.pairs = args.pairs or 256
    args.rows_per_file = args.rows_per_file or 2 * args.batch_size
    return device_label(args.device or "cuda") if args.gpu else "cpu"


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
        seconds.append(timed(lambda: hand(rows[i:i + batch_size], sources)))
        counts.append(len(rows[i:i + batch_size]))
    return rates(seconds, counts)


# ---------------------------------------------------------------------------------------------
# (b) the system, as a user runs it
# ---------------------------------------------------------------------------------------------
def system_run(args, synthetic: str, name: str) -> dict:
    """`diffmix-ray score` on `synthetic` as a user runs it. With score files of 2 batches (the default
    here) a block is 2 batches, and the files' times give a timeline, as in bench_generate.py; the
    first write also waits for its worker's start (imports), which would shorten the next interval:
    the timeline starts at the second write."""
    argv = ["score", "--synthetic", synthetic, "--clip", args.clip, "--name", name, "--batch-size",
            str(args.batch_size), "--cpus-per-actor", str(args.threads), "--rows-per-file", str(args.rows_per_file)]
    started, wall, tree = run_cli(argv, os.path.join(os.path.dirname(synthetic), f"{name}.log"))
    out = os.path.join(synthetic, "scores", name)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    r = timeline(writes(out), started, wall, skip=1)
    return {"pairs": manifest["counts"]["scored"], "wall_s": wall, "writes": r["writes"], "cpu_s": tree.cpu_s,
            "first_file_s": r["first_write_s"], "score_s": manifest["timings"]["score_s"],
            "steady_images_per_s": r["steady_images_per_s"], "median_images_per_s": r["median_images_per_s"]}


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


def cpu_main(args, results) -> None:
    import dataclasses

    import torch

    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.score.scorer import Scorer

    with workdir(args.work, "bench-score-") as work:
        # Shards as large as (b)'s blocks: each block reads exactly one shard.
        synthetic = make_inputs(work, max(CLASSES, args.pairs // args.per_image), args.per_image, args.rows_per_file)
        rows, sources, info = load_pairs(synthetic)
        print(f"{len(rows)} pairs ({args.per_image} per source, {SIZE[0]}x{SIZE[1]} JPEGs), --clip {args.clip}, "
              f"batch {args.batch_size}, {args.threads} thread(s); machine: {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        results.update(pairs=len(rows), clip=args.clip, batch_size=args.batch_size, threads=args.threads)
        prep = dataclasses.asdict(resolve_clip(args.clip).prep)
        torch.set_num_threads(args.threads)
        scorer = Scorer(args.clip, info.classes, info.super_class, threads=args.threads)
        hand = HandWritten(args.clip, info)
        a1 = floor_loop(scorer, rows, sources, args.batch_size, prep)
        results.update(floor=rounded(a1))
        h = hand_loop(hand, rows[:4 * args.batch_size], sources, args.batch_size)  # slow: 4 batches tell its rate
        results.update(hand_written=rounded(h))
        print(f"(a) floor:        {fmt(a1)}", flush=True)
        print(f"(h) hand-written: {fmt(h)}", flush=True)
        b = system(args, synthetic)
        results.update(system=rounded(b))
        a2 = floor_loop(scorer, rows, sources, args.batch_size, prep)  # again: a neighbour's load drifts
        results.update(floor_again=rounded(a2))
        print(f"(a) again:        {fmt(a2)}", flush=True)
        a = {k: (a1[k] + a2[k]) / 2 for k in ("steady_images_per_s", "median_images_per_s", "per_cpu_s")}
        print(f"(b) system:       {fmt(b)}; {b['pairs']} pairs: wall {b['wall_s']:.1f} s, first score file at "
              f"{b['first_file_s']:.1f} s, {b['writes']} writes; {b['small']['pairs']} pairs: wall "
              f"{b['small']['wall_s']:.1f} s; the extra pairs: {b['marginal_per_s']:.2f} pairs/s", flush=True)
        compare(results, "b/a", b, a, " (target >= 0.85)")
        compare(results, "b/h", b, h)
        per_cpu = b["per_cpu_s"] / a["per_cpu_s"]
        print(f"per CPU second: b/a = {per_cpu:.2f} ((b): every process of the run, the "
              f"extra pairs over the extra CPU seconds)")
        print(f"end to end: {b['pairs'] / b['wall_s']:.2f} pairs/s over (b)'s whole wall time (Python, Ray and "
              "actor start-up included)")
        results.add("ratios", "b/a per CPU second", round(per_cpu, 3))
        results.update(end_to_end_pairs_per_s=round(b["pairs"] / b["wall_s"], 3))


# ---------------------------------------------------------------------------------------------
# --gpu: the model work alone, without Ray
# ---------------------------------------------------------------------------------------------
def device_batch(n: int, per_image: int, hw: tuple[int, int], seed: int) -> dict:
    """A batch as the CPU stage hands it to the actor: pixels decoded and cropped, a source's pairs
    neighbours."""
    from diffmix_ray.score.cpu_stages import COL_CLIP, COL_CLIP_SRC, COL_ERROR

    rng = np.random.default_rng(seed)
    sources = rng.integers(0, 256, (max(1, n // per_image), *hw, 3), dtype=np.uint8)
    which = np.arange(n) // per_image % len(sources)
    return {"pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "source_id": np.array([f"s{seed}-{w}" for w in which], dtype=object),
            "source_label": rng.integers(0, 4, n), "target_label": rng.integers(0, 4, n),
            "_src_file": np.zeros(n, np.int32), COL_CLIP: rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8),
            COL_CLIP_SRC: sources[which], COL_ERROR: np.array([""] * n, dtype=object)}


def decode_rate(per_image: int, pairs: int = 64) -> float:
    """Pairs/s of the CPU stage's decode + resize (one process, one core)."""
    import dataclasses

    from _inputs import cub_like_image, jpeg
    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.score.cpu_stages import decode_pairs

    rng = np.random.default_rng(0)
    images = [jpeg(cub_like_image(i, rng)) for i in range(pairs // per_image + 1)]
    keys = {"pair_id": np.array([f"p{i}" for i in range(pairs)], dtype=object),
            "source_id": np.array([f"s{i // per_image}" for i in range(pairs)], dtype=object),
            "source_label": np.zeros(pairs, int), "target_label": np.ones(pairs, int),
            "_src_file": np.zeros(pairs, np.int32)}
    syn = [images[(i + 1) % len(images)] for i in range(pairs)]
    src = [images[i // per_image] for i in range(pairs)]
    prep = dataclasses.asdict(resolve_clip("clip-b32").prep)
    return pairs / timed(lambda: decode_pairs(keys, syn, src, np.ones(pairs, bool), prep, None))


def gpu_main(args, results) -> None:
    import torch

    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--gpu: CUDA is not available to this torch; pass --device cpu to try the script on a CPU")
    on_cuda = device.startswith("cuda")
    if "ray" in sys.modules:
        print("note: Ray was imported by something; this benchmark needs none")
    info = SimpleNamespace(classes=[f"species {i}" for i in range(args.classes)], super_class="bird")
    device_name = torch.cuda.get_device_name() if on_cuda else device
    results.update(device=device_name, clip=args.clip, classes=args.classes, per_image=args.per_image,
                   torch=torch.__version__)
    (actor, hand_rate), B = halving(lambda B: model_rates(args, info, device, B, results), args.batch_size)
    cpu = decode_rate(args.per_image)
    results.update(cpu_stage_pairs_per_s_per_core=round(cpu, 1), cores_per_device=round(actor / cpu, 1))
    print(f"hand-written: {hand_rate:.0f} images/s; actor/hand-written = {actor / hand_rate:.2f}")
    print(f"CPU stage:    {cpu:.0f} pairs/s per core (decode + resize of 500x375 JPEGs): "
          f"{actor / cpu:.1f} cores keep this device busy")


def model_rates(args, info, device: str, B: int, results) -> tuple[float, float]:
    """images/s of the actor's call and of the hand-written forward at batch B."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffmix_ray.score.scorer import Scorer

    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else None
    scorer = Scorer(args.clip, info.classes, info.super_class, device=device, threads=args.threads)
    hw = scorer.ref.prep.output_hw
    batches = [device_batch(B, args.per_image, hw, seed) for seed in range(4)]
    print(f"{args.clip} on {results.data['device']} ({scorer.dtype}), batch {B}, "
          f"{args.classes} classes, {args.per_image} pairs per source", flush=True)
    results.update(dtype=str(scorer.dtype), batch_size=B)

    def run(fn, n):
        return lambda: [fn(batches[i % 4]) for i in range(n)]

    timed(run(scorer, 2), sync)  # warm-up: cuDNN/cuBLAS choose their kernels
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    per_batch = timed(run(scorer, args.batches), sync) / args.batches
    nan = sum(int((scorer(b)["_error"] != "").sum()) for b in batches)
    with FlopCounterMode(display=False) as counter:
        scorer.score(batches[0], np.arange(B))
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
    actor = B / per_batch
    results.update(actor_images_per_s=round(actor, 1), gflop_per_pair=round(counter.get_total_flops() / B / 1e9, 3),
                   peak_gib=None if peak != peak else round(peak, 2), nan_scores=nan)
    print(f"actor:        {actor:.0f} images/s ({1000 * per_batch:.1f} ms per batch of {B}); "
          f"{counter.get_total_flops() / B / 1e9:.2f} GFLOP per pair; peak memory {peak:.2f} GiB; "
          f"NaN scores {nan}/{4 * B}", flush=True)

    hand = HandWritten(args.clip, info, device=device)

    def hand_batch(b):
        pixels = scorer._pixels(b["_clip"], scorer.mean, scorer.std, scorer.rescale)
        src = scorer._pixels(b["_clip_src"], scorer.mean, scorer.std, scorer.rescale)
        t = torch.as_tensor(b["target_label"], device=scorer.device)
        s = torch.as_tensor(b["source_label"], device=scorer.device)
        hand.model_part(pixels, src, t, s)

    timed(run(hand_batch, 2), sync)
    hand_rate = B / (timed(run(hand_batch, args.batches), sync) / args.batches)
    results.update(hand_written_images_per_s=round(hand_rate, 1), actor_vs_hand_written=round(actor / hand_rate, 3))
    return actor, hand_rate


def measure(args, results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gpu_main(args, results) if args.gpu else cpu_main(args, results)


if __name__ == "__main__":
    bench.main(measure, device_of)
