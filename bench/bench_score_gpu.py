"""The model work of `score` on one device, without Ray (run through `bench_score.py --gpu`).

Pixels arrive decoded and cropped, as the CPU stage hands them to the actor; each source image
serves --per-image pairs (as in generate's shards, where a source's pairs are neighbours). Measured:

  actor         Scorer.__call__: uint8 batch to the device, normalisation, one image-tower pass for the
                synthetic images and one for their distinct sources, every score, one copy back
  hand-written  the reference's filter loop extended to the same scores, model part only: CLIPModel
                forward with the class prompts and again with the object prompts (text encoded per
                batch), image features of every pair's source (no sharing)

images/s (synthetic images scored), FLOPs per pair (torch's FlopCounterMode), peak memory, NaN
scores (random fp16 weights may overflow), and the CPU stage's decode + resize rate on one core
(500x375 JPEGs), which says how many CPU workers keep one GPU busy."""

from __future__ import annotations

import io
import sys
import time
from types import SimpleNamespace

import numpy as np


def _batch(n: int, per_image: int, hw: tuple[int, int], seed: int) -> dict:
    from diffmix_ray.score.cpu_stages import COL_CLIP, COL_CLIP_SRC, COL_ERROR

    rng = np.random.default_rng(seed)
    sources = rng.integers(0, 256, (max(1, n // per_image), *hw, 3), dtype=np.uint8)
    which = np.arange(n) // per_image % len(sources)
    return {"pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "source_id": np.array([f"s{seed}-{w}" for w in which], dtype=object),
            "source_label": rng.integers(0, 4, n), "target_label": rng.integers(0, 4, n),
            "_src_file": np.zeros(n, np.int32), COL_CLIP: rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8),
            COL_CLIP_SRC: sources[which], COL_ERROR: np.array([""] * n, dtype=object)}


def _timed(fn, batches: list, sync) -> float:
    """Seconds per batch over `batches`, after the device has finished each."""
    t = time.perf_counter()
    for b in batches:
        fn(b)
    sync()
    return (time.perf_counter() - t) / len(batches)


def decode_rate(per_image: int, pairs: int = 64) -> float:
    """Pairs/s of the CPU stage's decode + resize (one process, one core)."""
    import dataclasses

    from diffmix_ray.data.sample import draw_sample
    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.score.cpu_stages import decode_pairs

    rng = np.random.default_rng(0)
    images = []
    for i in range(pairs // per_image + 1):
        buf = io.BytesIO()
        draw_sample(i % 4, rng, size=500).resize((500, 375)).save(buf, format="JPEG", quality=95)
        images.append(buf.getvalue())
    keys = {"pair_id": np.array([f"p{i}" for i in range(pairs)], dtype=object),
            "source_id": np.array([f"s{i // per_image}" for i in range(pairs)], dtype=object),
            "source_label": np.zeros(pairs, int), "target_label": np.ones(pairs, int),
            "_src_file": np.zeros(pairs, np.int32)}
    syn = [images[(i + 1) % len(images)] for i in range(pairs)]
    src = [images[i // per_image] for i in range(pairs)]
    prep = dataclasses.asdict(resolve_clip("clip-b32").prep)
    t = time.perf_counter()
    decode_pairs(keys, syn, src, np.ones(pairs, bool), prep, None)
    return pairs / (time.perf_counter() - t)


def run_gpu(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from _results import Results
    from _score_parts import HandWritten
    from diffmix_ray.score.scorer import Scorer

    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--gpu: CUDA is not available to this torch; pass --device cpu to try the script on a CPU")
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if "ray" in sys.modules:
        print("note: Ray was imported by something; this benchmark needs none")
    info = SimpleNamespace(classes=[f"species {i}" for i in range(args.classes)], super_class="bird")
    B = args.batch_size
    scorer = Scorer(args.clip, info.classes, info.super_class, device=device, threads=args.threads)
    hw = scorer.ref.prep.output_hw
    batches = [_batch(B, args.per_image, hw, seed) for seed in range(4)]
    device_name = torch.cuda.get_device_name() if on_cuda else device
    print(f"{args.clip} on {device_name} ({scorer.dtype}), batch {B}, "
          f"{args.classes} classes, {args.per_image} pairs per source", flush=True)
    results = Results(getattr(args, "json", None), device=device_name, clip=args.clip, dtype=str(scorer.dtype),
                      batch_size=B, classes=args.classes, per_image=args.per_image, torch=torch.__version__)

    _timed(scorer, batches[:2], sync)  # warm-up: cuDNN/cuBLAS choose their kernels
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    per_batch = _timed(scorer, [batches[i % 4] for i in range(args.batches)], sync)
    nan = sum(int((scorer(b)["_error"] != "").sum()) for b in batches)
    with FlopCounterMode(display=False) as counter:
        scorer.score(batches[0], np.arange(B))
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
    actor = B / per_batch
    results.update(actor_images_per_s=round(actor, 1), gflop_per_pair=round(counter.get_total_flops() / B / 1e9, 3),
                   peak_gib=None if peak != peak else round(peak, 2), nan_scores=nan)

    hand = HandWritten(args.clip, info, device=device)

    def hand_batch(b):
        pixels = scorer._pixels(b["_clip"], scorer.mean, scorer.std, scorer.rescale)
        src = scorer._pixels(b["_clip_src"], scorer.mean, scorer.std, scorer.rescale)
        t = torch.as_tensor(b["target_label"], device=scorer.device)
        s = torch.as_tensor(b["source_label"], device=scorer.device)
        hand.model_part(pixels, src, t, s)

    _timed(hand_batch, batches[:2], sync)
    hand_rate = B / _timed(hand_batch, [batches[i % 4] for i in range(args.batches)], sync)
    results.update(hand_written_images_per_s=round(hand_rate, 1), actor_vs_hand_written=round(actor / hand_rate, 3))
    cpu = decode_rate(args.per_image)
    results.update(cpu_stage_pairs_per_s_per_core=round(cpu, 1), cores_per_device=round(actor / cpu, 1))
    print(f"actor:        {actor:.0f} images/s ({1000 * per_batch:.1f} ms per batch of {B}); "
          f"{counter.get_total_flops() / B / 1e9:.2f} GFLOP per pair; peak memory {peak:.2f} GiB; "
          f"NaN scores {nan}/{4 * B}")
    print(f"hand-written: {hand_rate:.0f} images/s; actor/hand-written = {actor / hand_rate:.2f}")
    print(f"CPU stage:    {cpu:.0f} pairs/s per core (decode + resize of 500x375 JPEGs): "
          f"{actor / cpu:.1f} cores keep this device busy")
