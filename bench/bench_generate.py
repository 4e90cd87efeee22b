"""generate benchmark: the same pairs, model, batch size and threads, measured in one run, three ways:

  (a) floor      a bare single-process diffusers img2img loop (decode, translate, JPEG in memory)
  (b) system     `diffmix-ray generate` in its own process, on the local Ray it starts, writing shards
  (c) reference  the reference code's loop: batch 1, one PNG file per image

then (b) again with 10x the pairs, to compare peak memory (the pipeline must stream).

    .venv/bin/python bench/bench_generate.py [--pairs 96] [--steps 10] [--batch-size 4] [--threads 2]

Prints figures and writes them to bench/results/ (--json); asserts nothing. Targets: b/a >= 0.85
(steady state), b/c >= 3, memory 10x/1x <= 1.2. See bench/README.md for what each figure means."""

from __future__ import annotations

import io
import os
import time

from _harness import Bench, compare, rates, rounded, run_cli, timeline, workdir, writes  # beside this file
from _inputs import img2img_pipeline, sample_dataset

CLASSES = 4
IMAGE_SIZE = 128  # the bench model's resolution: no resize anywhere, in any of the three loops

bench = Bench("generate", __doc__)
bench.parser.add_argument("--pairs", type=int, default=96, help="pairs of the base run (2 per train image)")
bench.parser.add_argument("--scale", type=int, default=10, help="the memory run has scale x pairs (0: skip it)")
bench.parser.add_argument("--steps", type=int, default=10)
bench.parser.add_argument("--batch-size", type=int, default=4)
bench.parser.add_argument("--threads", type=int, default=2, help="torch threads in (a)/(c); CPUs of the actor in (b)")
bench.parser.add_argument("--work", default=None, help="working folder (default: a temp folder, deleted after)")


# ---------------------------------------------------------------------------------------------
# Inputs: one dataset, one model folder, one plan, shared by (a), (b) and (c)
# ---------------------------------------------------------------------------------------------
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

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the translation actor does on CPU (denormals are ~10x slower)
    return img2img_pipeline(model)


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
def system_argv(cfg) -> list[str]:
    argv = ["generate", "--dataset", cfg.dataset, "--model", cfg.model, "--out", cfg.out, "--mode", cfg.mode,
            "--multiplier", str(cfg.multiplier), "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--max-actors", "1", "--cpus-per-actor", str(cfg.cpus_per_actor),
            "--rows-per-shard", str(cfg.rows_per_shard), "--strength", str(cfg.strength)]
    for flag, value in (("--concepts", cfg.concepts), ("--limit", cfg.limit), ("--gpus-per-actor", cfg.gpus_per_actor)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def system_run(cfg, work: str, name: str) -> dict:
    """`diffmix-ray generate` for `cfg` (whose out is work/name); its timeline is read from the shard
    files' mtimes (a shard holds 2 batches), its memory sampled over its whole process tree."""
    import json

    started, wall, tree = run_cli(system_argv(cfg), os.path.join(work, f"{name}.log"), cpu=False, memory=True,
                                  period=1.0)
    with open(os.path.join(cfg.out, "manifest.json")) as f:
        manifest = json.load(f)
    return timeline(writes(os.path.join(cfg.out, "shards")), started, wall) | {
        "manifest_images_per_s": manifest["timings"]["images_per_s"],
        "peak_rss_gib": tree.peak_rss / 2**30, "peak_pss_gib": tree.peak_pss / 2**30}


def fmt(r: dict) -> str:
    return f"{r['steady_images_per_s']:.2f} images/s steady (median {r['median_images_per_s']:.2f})"


def measure(args, results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffmix_ray.models.loader import write_model

    with workdir(args.work, "bench-gen-") as work:
        dataset = sample_dataset(work, CLASSES, max(CLASSES, args.pairs // 2) // CLASSES, IMAGE_SIZE)
        model = write_model("bench:0", os.path.join(work, "model"))
        base = gen_config(args, dataset, model, os.path.join(work, "b"), multiplier=2.0)
        pairs = planned_pairs(base)
        print(f"{len(pairs)} pairs, bench model ({IMAGE_SIZE} px), {args.steps} steps, batch {args.batch_size}, "
              f"{args.threads} threads; machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        results.update(pairs=len(pairs), model=f"bench ({IMAGE_SIZE} px)")

        t = time.perf_counter()
        pipe = load_pipe(model, args.threads)
        load_s = time.perf_counter() - t
        a = floor_loop(pipe, pairs, args)
        print(f"(a) floor:     {fmt(a)}; all batches {a['images_per_s']:.2f}; model load {load_s:.1f} s", flush=True)
        results.update(floor=rounded(a), model_load_s=round(load_s, 1))
        c = reference_loop(pipe, pairs, args, os.path.join(work, "c"))
        print(f"(c) reference: {fmt(c)}; all images {c['images_per_s']:.2f}", flush=True)
        results.update(reference=rounded(c))
        del pipe

        b = system_run(base, work, "b")
        results.update(system=rounded(b))
        # (a) again, after (b): a busy neighbour's load drifts; both figures show how much.
        pipe = load_pipe(model, args.threads)
        a2 = floor_loop(pipe, pairs, args)
        del pipe
        print(f"(a) again:     {fmt(a2)}", flush=True)
        results.update(floor_again=rounded(a2))
        a = {k: (a[k] + a2[k]) / 2 for k in ("steady_images_per_s", "median_images_per_s")}
        print(f"(b) system:    {fmt(b)}; wall {b['wall_s']:.1f} s = start-up {b['startup_s']:.1f} s (first shard at "
              f"{b['first_write_s']:.1f} s) + translation + {b['after_last_write_s']:.1f} s after the last shard; "
              f"manifest {b['manifest_images_per_s']:.2f} images/s incl. actor start; "
              f"peak RSS {b['peak_rss_gib']:.2f} GiB, PSS {b['peak_pss_gib']:.2f} GiB", flush=True)

        compare(results, "b/a", b, a, "   (target >= 0.85)")  # a: the mean of its two runs
        compare(results, "b/c", b, c, "   (target >= 3)")
        end_to_end = (c["seconds"] + load_s) / b["wall_s"]
        print(f"c/b end to end (c's loop + model load vs b's wall incl. Ray and actor start) = {end_to_end:.2f}")
        results.add("ratios", "c/b end to end", round(end_to_end, 3))
        if args.scale:
            big = system_run(gen_config(args, dataset, model, os.path.join(work, "b10"), 2.0 * args.scale),
                             work, "b10")
            print(f"(b) x{args.scale}:      {big['images']} images, {fmt(big)}, wall {big['wall_s']:.1f} s; "
                  f"peak RSS {big['peak_rss_gib']:.2f} GiB, PSS {big['peak_pss_gib']:.2f} GiB")
            rss, pss = big["peak_rss_gib"] / b["peak_rss_gib"], big["peak_pss_gib"] / b["peak_pss_gib"]
            print(f"memory x{args.scale}/x1: RSS {rss:.2f}, PSS {pss:.2f}   (target <= 1.2)")
            results.update(system_scaled=rounded(big), memory_ratio={"scale": args.scale, "rss": round(rss, 3),
                                                                     "pss": round(pss, 3)})


if __name__ == "__main__":
    bench.main(measure)
