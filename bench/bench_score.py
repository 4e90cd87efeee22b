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
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CLI = os.path.join(os.path.dirname(sys.executable), "diffmix-ray")
CLASSES = 4
SIZE = (500, 375)  # CUB's typical JPEG; generate writes translations back at the source's size


# ---------------------------------------------------------------------------------------------
# Inputs: a canonical dataset and a generate output in the shard contract (no diffusion: each
# "translation" is its source with the colour channels rolled, re-encoded)
# ---------------------------------------------------------------------------------------------
def jpeg(img, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_inputs(work: str, train_images: int, per_image: int, shard_rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffmix_ray import canonical, storage
    from diffmix_ray.contracts import SHARD_SCHEMA
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_CLASSES, SAMPLE_SUPER_CLASS, draw_sample

    rng = np.random.default_rng(0)
    raw = os.path.join(work, "raw")
    for i in range(train_images):
        folder = os.path.join(raw, SAMPLE_CLASSES[i % CLASSES][0])
        os.makedirs(folder, exist_ok=True)
        draw_sample(i % CLASSES, rng, size=SIZE[0]).resize(SIZE).save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
    dataset = os.path.join(work, "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=SAMPLE_SUPER_CLASS, val_fraction=0.0), dataset,
            show_progress=False)
    ds = canonical.open_dataset(dataset)
    train = ds.read_split("train").to_pylist()
    rows = []
    for r in train:  # a source's pairs are neighbours, as in generate's shards
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        shifted = jpeg(Image.fromarray(np.roll(pixels, 1, axis=2)))
        for k in range(per_image):
            target = (r["label"] + 1 + k) % CLASSES
            rows.append({"pair_id": f"b-{len(rows):08d}", "source_id": r["image_id"], "source_label": r["label"],
                         "target_label": target, "strength": 0.7, "seed": len(rows), "mode": "real-mix",
                         "image": shifted, "width": SIZE[0], "height": SIZE[1], "prompt": ds.info.classes[target]})
    synthetic = os.path.join(work, "synthetic")
    os.makedirs(os.path.join(synthetic, "shards"))
    for i in range(0, len(rows), shard_rows):
        pq.write_table(pa.Table.from_pylist(rows[i:i + shard_rows], schema=SHARD_SCHEMA),
                       os.path.join(synthetic, "shards", f"shard-bench-{i // shard_rows:05d}.parquet"))
    storage.write_json_atomic(os.path.join(synthetic, "manifest.json"), {
        "identity": {"dataset": ds.uri, "bench": "bench_score", "per_image": per_image},
        "dataset_fingerprint": ds.info.fingerprint,
        "counts": {"planned": len(rows), "generated": len(rows), "missing": 0, "failed": 0}})
    storage.write_text_atomic(os.path.join(synthetic, "_SUCCESS"), "")
    return synthetic


def load_pairs(synthetic: str) -> tuple[list[dict], dict[str, bytes], object]:
    import pyarrow.parquet as pq

    from diffmix_ray import canonical, storage

    rows = pq.read_table(os.path.join(synthetic, "shards")).to_pylist()
    ds = canonical.open_dataset(storage.read_json(os.path.join(synthetic, "manifest.json"))["identity"]["dataset"])
    sources = {r["image_id"]: r["image"] for r in ds.read_split("train").to_pylist()}
    return rows, sources, ds.info


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

    seconds, counts = [], []
    for i in range(0, len(rows), batch_size):
        b = rows[i:i + batch_size]
        t = time.perf_counter()
        keys = {"pair_id": np.array([r["pair_id"] for r in b], dtype=object),
                "source_id": np.array([r["source_id"] for r in b], dtype=object),
                "source_label": np.array([r["source_label"] for r in b]),
                "target_label": np.array([r["target_label"] for r in b]), "_src_file": np.zeros(len(b), np.int32)}
        batch = decode_pairs(keys, [r["image"] for r in b], [sources[r["source_id"]] for r in b],
                             np.ones(len(b), bool), prep, None)
        finish_scores(scorer(batch), None)
        seconds.append(time.perf_counter() - t)
        counts.append(len(b))
    return rates(seconds, counts)


class HandWritten:
    """The reference's filter loop, extended to the project's scores, as a user would write it."""

    def __init__(self, clip: str, info, device: str | None = None):
        from transformers.models.clip import CLIPImageProcessorPil

        from diffmix_ray.contracts import object_prompts
        from diffmix_ray.models.clip import load_clip
        from diffmix_ray.score.scorer import class_prompts

        self.model, self.tokenizer, ref = load_clip(clip, device=device)
        p = ref.prep
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": p.shortest_edge}, resample=p.resample,
                                               crop_size={"height": p.crop[0], "width": p.crop[1]},
                                               image_mean=list(p.mean), image_std=list(p.std))
        self.prompts = class_prompts(info.classes, info.super_class)
        self.objects = list(object_prompts(info.super_class))

    def model_part(self, pixels, src_pixels, targets, sources):
        import torch

        m = self.model
        with torch.inference_mode():
            cls = self.tokenizer(self.prompts, padding=True, return_tensors="pt").to(m.device)
            obj = self.tokenizer(self.objects, padding=True, return_tensors="pt").to(m.device)
            probs = m(pixel_values=pixels, **cls).logits_per_image.softmax(-1)
            with_obj = m(pixel_values=pixels, **obj).logits_per_image.softmax(-1)[:, 0]
            a = m.get_image_features(pixel_values=pixels).pooler_output
            b = m.get_image_features(pixel_values=src_pixels).pooler_output
            sim = torch.nn.functional.cosine_similarity(a, b)
            at = torch.arange(len(targets), device=m.device)
            out = [probs[at, targets], probs[at, sources], with_obj, sim]
            return [o.float().cpu().numpy() for o in out]

    def __call__(self, batch_rows, sources: dict[str, bytes]):
        import torch
        from PIL import Image

        imgs = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in batch_rows]
        srcs = [Image.open(io.BytesIO(sources[r["source_id"]])).convert("RGB") for r in batch_rows]
        dtype, device = self.model.dtype, self.model.device
        pixels = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(device, dtype)
        src = self.processor(images=srcs, return_tensors="pt")["pixel_values"].to(device, dtype)
        t = torch.as_tensor([r["target_label"] for r in batch_rows], device=device)
        s = torch.as_tensor([r["source_label"] for r in batch_rows], device=device)
        return self.model_part(pixels, src, t, s)


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
    """`diffmix-ray score` on `synthetic` as a user runs it, with score files of 2 batches (so a
    block is 2 batches, and the files' times give a timeline, as in bench_generate.py)."""
    import pyarrow.parquet as pq

    ray_tmp = tempfile.mkdtemp(prefix="dmrs-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, DIFFMIX_RAY_DASHBOARD="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [CLI, "score", "--synthetic", synthetic, "--clip", args.clip, "--name", name, "--batch-size",
           str(args.batch_size), "--cpus-per-actor", str(args.threads), "--rows-per-file", str(2 * args.batch_size)]
    log = os.path.join(os.path.dirname(synthetic), f"{name}.log")
    started = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True).returncode
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
    if len(writes) < 4:
        sys.exit(f"{name}: only {len(writes)} writes; pass more --pairs for a timeline (>= 4 blocks of 2 batches)")
    times = [t for t, _ in writes]
    # The first write also waits for its worker's start (imports), which would shorten the next
    # interval: the timeline starts at the second write.
    rows = [n for _, n in writes[2:]]
    per = sorted(n / (b - a) for n, a, b in zip(rows, times[1:], times[2:]))
    r = {"steady_images_per_s": sum(rows) / (times[-1] - times[1]), "median_images_per_s": per[len(per) // 2]}
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return r | {"pairs": manifest["counts"]["scored"], "wall_s": wall, "writes": len(writes),
                "first_file_s": times[0] - started, "score_s": manifest["timings"]["score_s"]}


def fmt(r: dict) -> str:
    return f"{r['steady_images_per_s']:.2f} pairs/s steady (median {r['median_images_per_s']:.2f})"


def cpu_main(args) -> None:
    import dataclasses

    import torch

    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.score.scorer import Scorer

    work = args.work or tempfile.mkdtemp(prefix="bench-score-")
    try:
        # Shards of 2 batches, like (b)'s blocks: each block reads exactly one shard.
        synthetic = make_inputs(work, max(CLASSES, args.pairs // args.per_image), args.per_image,
                                2 * args.batch_size)
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
        b = system_run(args, synthetic, "bench")
        a2 = floor_loop(scorer, rows, sources, args.batch_size, prep)  # again: a neighbour's load drifts
        print(f"(a) again:        {fmt(a2)}", flush=True)
        a = {k: (a1[k] + a2[k]) / 2 for k in ("steady_images_per_s", "median_images_per_s")}
        print(f"(b) system:       {fmt(b)}; wall {b['wall_s']:.1f} s, first score file at {b['first_file_s']:.1f} s, "
              f"{b['writes']} writes; Ray part {b['score_s']:.1f} s", flush=True)
        for name, ref, target in (("b/a", a, " (target >= 0.85)"), ("b/h", h, "")):
            print(f"{name} steady = {b['steady_images_per_s'] / ref['steady_images_per_s']:.2f}, median = "
                  f"{b['median_images_per_s'] / ref['median_images_per_s']:.2f}{target}")
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
    p.add_argument("--threads", type=int, default=1, help="torch threads in (a)/(h); CPUs of the actor in (b)")
    p.add_argument("--work", default=None, help="working folder (default: a temp folder, deleted after)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.clip = args.clip or "clip-b32"
    args.batch_size = args.batch_size or (256 if args.gpu else 16)
    args.pairs = args.pairs or 256
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
