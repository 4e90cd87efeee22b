"""generate on one GPU, measured side by side in one run (see bench/README.md):

  (a) bare     a plain diffusers img2img loop at the Diff-Mix setting, as a user would write it:
               decode + resize the sources, the pipeline with the concept bank loaded by diffusers'
               own loaders (LoRA unfused), prompts as text (encoded every batch), per-pair
               generators (so diffusers VAE-encodes image by image), PIL output, resize back + JPEG
  (t) tuned    the same loop written for speed, with what the project does: the LoRA fused, the
               class prompts encoded once, one VAE encode per batch (each pair still sampling with
               its own generator), channels_last on CUDA, the UNet compiled in the compile-on case
  (b) ours     the project's per-batch code in this process: the CPU stage before translation,
               the translation actor, the CPU stage after it (serially; Ray overlaps them)
  (c) system   `diffmix-ray generate` end to end on a local Ray (only where Ray is installed)

for each batch size and compile off/on, on the same pairs, model and bank. Prints images/s,
TFLOP/s (FLOPs per image counted by torch's FlopCounterMode on this model and setting), the
fraction of the device's limit (peak dense matmul TFLOP/s measured here / FLOPs per image), and
b/a (the project against the naive loop: its optimisations and its overhead together), b/t (against
the tuned loop: the project's own overhead alone), c/a. Exits 1 if any pair failed (random fp16
weights could give NaN or black images, and a benchmark that skips their JPEG work looks too fast).
Needs no Ray for (a), (t) and (b).

    python bench/bench_generate_gpu.py                 # one GPU, sd15, batch 8/16/32, compile off/on
    python bench/bench_generate_gpu.py --quick         # batch 16, compile off/on: < 2 minutes
    python bench/bench_generate_gpu.py --device cpu    # bench preset, batch 4, compile off (this laptop)

A batch that runs out of device memory is halved until it fits (the row says so). The figures go to
bench/results/ (--json) after every case.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import time

import numpy as np

from _harness import Bench, describe_device, device_label, halving, rates, run_cli, sync, timeline, workdir, writes
from _inputs import SOURCE_SIZE, cub_like_dataset, img2img_pipeline, model_folder, random_bank

CLASSES = 4

bench = Bench("generate-gpu", __doc__)
p = bench.parser
p.add_argument("--device", default=None, help="cuda (default when available) | cpu")
p.add_argument("--preset", default=None, help="model preset (default: sd15 on cuda, bench on cpu)")
p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 8,16,32 on cuda, 4 on cpu)")
p.add_argument("--compile", default=None, help="off,on (default on cuda; off on cpu)")
p.add_argument("--batches", type=int, default=None, help="timed batches per case, after one warm-up batch")
p.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps (Diff-Mix: 25)")
p.add_argument("--strength", type=float, default=0.7, help="Diff-Mix: 0.7 (17 of 25 steps)")
p.add_argument("--quick", action="store_true", help="batch 16, compile off,on, 2 timed batches")
p.add_argument("--no-system", action="store_true", help="skip (c) even if Ray is installed")
p.add_argument("--budget-s", type=float, default=None, help="skip cases that would end past this (default "
               "280, quick 110)")
p.add_argument("--work", default=None, help="working folder (default: a temp folder, deleted after)")
p.add_argument("--model", default=None, help="a model folder to use instead of writing the preset")


def device_of(args) -> str:
    """Fills in the defaults that depend on the device; the device's label for the results file."""
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("sd15" if gpu else "bench")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("16" if args.quick else "8,16,32" if gpu else "4"))
                        .split(",")]
    args.compile = [c.strip() == "on" for c in (args.compile or ("off,on" if gpu else "off")).split(",")]
    args.batches = args.batches or (2 if args.quick else 3)
    args.budget_s = args.budget_s or (110.0 if args.quick else 280.0)
    return device_label(args.device)


# ---------------------------------------------------------------------------------------------
# Inputs: CUB-like sources, a model folder, a random concept bank, the plan's pairs
# ---------------------------------------------------------------------------------------------
def make_inputs(work: str, args, n_images: int):
    dataset = cub_like_dataset(work, n_images, fit="crop", quality=90, super_class="bird")
    t = time.perf_counter()
    model = model_folder(work, args.preset, args.device, args.model)
    if not args.model:
        print(f"model {args.preset} written in {time.perf_counter() - t:.0f} s", flush=True)
    return dataset, model, random_bank(work, model, dataset)


def plan_pairs(dataset: str, args, n: int):
    """(plan table, source bytes per row) for n diff-mix pairs, as generate plans them."""
    from diffmix_ray import canonical
    from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
    from diffmix_ray.generate.config import GenerateConfig
    from diffmix_ray.generate.plan import make_plan

    ds = canonical.open_dataset(dataset)
    train = ds.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE, COL_LABEL])
    ids = train.column(COL_IMAGE_ID).to_pylist()
    cfg = GenerateConfig(dataset=dataset, mode="real-mix", strength=args.strength, steps=args.steps,
                         multiplier=max(1.0, n / len(ids)), limit=n)
    plan = make_plan(ids, train.column(COL_LABEL).to_pylist(), ds.info.num_classes, cfg)
    by_id = dict(zip(ids, train.column(COL_IMAGE).to_pylist()))
    return plan, [by_id[i] for i in plan.column("source_id").to_pylist()]


# ---------------------------------------------------------------------------------------------
# Device figures: peak matmul rate, FLOPs per translated image
# ---------------------------------------------------------------------------------------------
def peak_tflops(device: str) -> float:
    """Dense matmul TFLOP/s measured here: fp16 8192^3 on a GPU, fp32 2048^3 on a CPU."""
    import torch

    gpu = device.startswith("cuda")
    n, dtype, reps = (8192, torch.float16, 10) if gpu else (2048, torch.float32, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def tflop_per_image(pipe, steps_run: int) -> float:
    """steps_run UNet forwards at batch 2 (classifier-free guidance) + one VAE encode + decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    side = unet.config.sample_size
    dim = unet.config.cross_attention_dim
    dev, dtype = unet.device, unet.dtype
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(torch.zeros(2, 4, side, side, device=dev, dtype=dtype), torch.tensor(500, device=dev),
             encoder_hidden_states=torch.zeros(2, 77, dim, device=dev, dtype=dtype))
    unet_flops = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    px = side * pipe.vae_scale_factor
    with torch.inference_mode(), counter:
        latents = vae.encode(torch.zeros(1, 3, px, px, device=dev, dtype=dtype)).latent_dist.mean
        vae.decode(latents)
    return (steps_run * unet_flops + counter.get_total_flops()) / 1e12


# ---------------------------------------------------------------------------------------------
# (a) the bare diffusers loop and (b) the project's per-batch code
# ---------------------------------------------------------------------------------------------
def batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def bare_pipeline(model: str, bank: str, device: str):
    import torch

    from diffmix_ray.models import concepts as bank_io

    pipe = img2img_pipeline(model, device, torch.float16 if device.startswith("cuda") else torch.float32)
    loaded, local = bank_io.load_bank(bank)
    bank_io.apply_bank(pipe, loaded, local)  # diffusers' load_lora_weights + load_textual_inversion
    return pipe, loaded


def bare_loop(pipe, bank, plan, sources, size, args, keep: list | None = None) -> tuple[list[float], int]:
    """Seconds per batch and the number of failed (NaN/black) images; `keep` collects the translated
    pixels (uint8, at the model's resolution)."""
    import torch
    from PIL import Image

    targets = plan.column("target_label").to_pylist()
    seeds = plan.column("seed").to_pylist()
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    seconds, failed = [], 0
    for lo, hi in batches(plan.num_rows, size):
        t = time.perf_counter()
        images = [Image.open(io.BytesIO(sources[i])).convert("RGB") for i in range(lo, hi)]
        with torch.inference_mode():
            out = pipe(prompt=[bank.prompt(targets[i]) for i in range(lo, hi)],
                       image=[im.resize((side, side), Image.BILINEAR) for im in images],
                       strength=args.strength, num_inference_steps=args.steps, guidance_scale=7.5,
                       generator=[torch.Generator(pipe.device).manual_seed(seeds[i]) for i in range(lo, hi)]).images
        for im, src in zip(out, images):
            arr = np.asarray(im)
            failed += int(arr.max() < 2)  # PIL output: NaN comes out black
            if keep is not None:
                keep.append(arr)
            buf = io.BytesIO()
            im.resize(src.size, Image.BICUBIC).save(buf, format="JPEG", quality=95)
        sync(args.device)
        seconds.append(time.perf_counter() - t)
    return seconds, failed


def tuned_pipeline(model: str, bank: str, device: str, compiled: bool):
    """(t)'s pipeline: (a)'s, with the LoRA fused, every class prompt and the empty prompt encoded
    once, channels_last on CUDA, and the UNet compiled if asked."""
    import torch

    pipe, loaded = bare_pipeline(model, bank, device)
    if loaded.has_lora:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    with torch.inference_mode():
        prompts = [loaded.prompt(c) for c in range(len(loaded.tokens))]
        classes = pipe.encode_prompt(prompts, pipe.device, 1, False)[0]
        empty = pipe.encode_prompt([""], pipe.device, 1, False)[0]
    if device.startswith("cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compiled:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, dynamic=False)
    return pipe, classes, empty


def tuned_loop(tuned, plan, sources, size, args, keep: list | None = None) -> tuple[list[float], int]:
    """(a)'s work (decode, resize, translate, resize back, JPEG) through (t)'s pipeline: cached prompt
    embeddings, one VAE encode per batch, latents decoded and converted on the device. `keep` as in
    bare_loop."""
    import torch
    from PIL import Image

    pipe, classes, empty = tuned
    targets = plan.column("target_label").to_pylist()
    seeds = plan.column("seed").to_pylist()
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    seconds, failed = [], 0
    for lo, hi in batches(plan.num_rows, size):
        t = time.perf_counter()
        images = [Image.open(io.BytesIO(sources[i])).convert("RGB") for i in range(lo, hi)]
        pixels = np.stack([np.asarray(im.resize((side, side), Image.BILINEAR)) for im in images])
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(pipe.device).permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
            generators = [torch.Generator(pipe.device).manual_seed(seeds[i]) for i in range(lo, hi)]
            init = vae.encode(x).latent_dist.sample(generator=generators) * scale
            labels = torch.as_tensor(targets[lo:hi], device=pipe.device)
            latents = pipe(image=init, strength=args.strength, num_inference_steps=args.steps, guidance_scale=7.5,
                           prompt_embeds=classes[labels], negative_prompt_embeds=empty.expand(hi - lo, -1, -1),
                           generator=generators, output_type="latent").images
            out = ((vae.decode(latents / scale).sample.float() / 2 + 0.5).clamp(0, 1) * 255).round()
            out = out.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for arr, src in zip(out, images):
            failed += int(arr.max() < 2)
            if keep is not None:
                keep.append(arr)
            buf = io.BytesIO()
            Image.fromarray(arr).resize(src.size, Image.BICUBIC).save(buf, format="JPEG", quality=95)
        sync(args.device)
        seconds.append(time.perf_counter() - t)
    return seconds, failed


def our_loop(translator, plan, sources, size, args) -> tuple[list[float], int, dict]:
    """Seconds per batch, failed pairs, and seconds per stage over the timed batches."""
    from diffmix_ray.contracts import PLAN_SCHEMA
    from diffmix_ray.generate.cpu_stages import decode_sources, finish_images

    seconds, failed, stages = [], 0, {"before": 0.0, "actor": 0.0, "after": 0.0}
    for k, (lo, hi) in enumerate(batches(plan.num_rows, size)):
        rows = plan.slice(lo, hi - lo)
        t0 = time.perf_counter()
        columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in PLAN_SCHEMA.names}
        batch = decode_sources(columns, sources[lo:hi], translator.resolution)
        t1 = time.perf_counter()
        out = translator(batch)  # returns host arrays: the device work is done
        t2 = time.perf_counter()
        shard = finish_images(out, None, 95)
        t3 = time.perf_counter()
        failed += (hi - lo) - shard.num_rows
        seconds.append(t3 - t0)
        if k > 0:
            for name, dt in (("before", t1 - t0), ("actor", t2 - t1), ("after", t3 - t2)):
                stages[name] += dt
    return seconds, failed, stages


# ---------------------------------------------------------------------------------------------
# (c) the whole system, where Ray is installed
# ---------------------------------------------------------------------------------------------
def system_case(work, dataset, model, bank, size, pairs, args) -> dict:
    """`diffmix-ray generate` as a user runs it: its own process, the local Ray it starts, 1 actor."""
    gpu = args.device.startswith("cuda")
    out = os.path.join(work, f"c{size}")
    argv = ["generate", "--dataset", dataset, "--model", model, "--concepts", bank, "--out", out, "--mode", "diff-mix",
            "--strength", str(args.strength), "--steps", str(args.steps), "--batch-size", str(size),
            "--multiplier", "10.0", "--limit", str(pairs), "--rows-per-shard", str(2 * size), "--max-actors", "1",
            "--gpus-per-actor", "1.0" if gpu else "0.0",
            "--cpus-per-actor", "1.0" if gpu else str(float(min(os.cpu_count() or 1, 2)))]
    started, wall, _ = run_cli(argv, os.path.join(work, f"c{size}.log"), cpu=False, memory=True, period=1.0)
    return timeline(writes(os.path.join(out, "shards")), started, wall)


# ---------------------------------------------------------------------------------------------
def rate(seconds: list[float], size: int, n: int) -> float:
    """images/s over the timed batches (all but the first, which warms kernels and caches)."""
    return rates(seconds, [hi - lo for lo, hi in batches(n, size)])["steady_images_per_s"]


def measure(args, results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    import torch

    from diffmix_ray.generate.plan import denoising_steps
    from diffmix_ray.generate.translate import Translator

    failures = 0
    results.update(torch=torch.__version__)
    with workdir(args.work, "bench-gen-gpu-") as work:
        n_max = max(args.batch_sizes) * (args.batches + 1)
        dataset, model, bank = make_inputs(work, args, n_images=max(CLASSES * 2, n_max // 2))
        device_name = describe_device(args.device)
        peak = peak_tflops(args.device)
        pipe, loaded = bare_pipeline(model, bank, args.device)
        per_image = tflop_per_image(pipe, denoising_steps(args.strength, args.steps))
        limit = peak / per_image
        print(f"{device_name}: {args.model or args.preset}, s={args.strength} x {args.steps} steps, CFG 7.5, sources "
              f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}; {per_image:.3g} TFLOP per image; peak {peak:.3g} TFLOP/s "
              f"measured -> limit {limit:.2f} images/s", flush=True)
        rows = []
        results.update(device=device_name, model=args.model or args.preset, strength=args.strength, steps=args.steps,
                       tflop_per_image=round(per_image, 3), peak_tflops=round(peak, 1),
                       limit_images_per_s=round(limit, 3), rows=rows)

        def report(case, size, compiled, images_per_s, ref=None, extra=""):
            ratio = f"{images_per_s / ref:.2f}" if ref else "-"
            rows.append({"case": case, "batch": size, "compile": "on" if compiled else "off",
                         "images_per_s": round(images_per_s, 3), "vs_a": round(images_per_s / ref, 3) if ref else None,
                         "note": extra.strip()})
            results.update(rows=rows, wall_s=round(time.perf_counter() - started, 1))
            print(f"{case:<8} batch {size:>3} compile {'on ' if compiled else 'off'}  {images_per_s:7.2f} images/s  "
                  f"{images_per_s * per_image:7.1f} TFLOP/s  {100 * images_per_s / limit:5.1f}% of limit  "
                  f"vs (a) {ratio}{extra}", flush=True)

        bare_rates = {}

        def batch_case(size: int) -> int:
            """(a), then (b) and (t) per compile setting, at one batch size; the pairs that failed."""
            failed_here = 0
            n = size * (args.batches + 1)
            plan, sources = plan_pairs(dataset, args, n)
            seconds, failed = bare_loop(pipe, loaded, plan, sources, size, args)
            failed_here += failed
            bare = rate(seconds, size, n)
            report("(a) bare", size, False, bare)
            for compiled in args.compile:
                # A compiled case compiles (minutes on a cold cache); its part of the GPU session has a
                # budget of its own, so these limits only keep a case from starting too late to finish.
                if time.perf_counter() - started > args.budget_s * (0.7 if compiled else 0.85):
                    print(f"skipped batch {size} compile {'on' if compiled else 'off'}: too close to --budget-s "
                          f"{args.budget_s:.0f}")
                    continue
                case_started = time.perf_counter()
                translator = Translator(model, "mix", loaded.class_names, loaded.super_class, concepts=bank,
                                        steps=args.steps, device=args.device, batch_size=size, compile=compiled,
                                        compile_cache=os.path.join(work, "compile-cache") if compiled else None,
                                        threads=torch.get_num_threads())
                startup = time.perf_counter() - case_started
                seconds, failed, stages = our_loop(translator, plan, sources, size, args)
                failed_here += failed
                ours = rate(seconds, size, n)
                del translator
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                timed = n - size
                split = ", ".join(f"{k} {1000 * v / timed:.1f}" for k, v in stages.items())
                report("(b) ours", size, compiled, ours, bare,
                       f"   [ms/image: {split}; actor alone {timed / stages['actor']:.2f} images/s; start "
                       f"{startup:.0f} s]")
                # (t) loads and, if on, compiles a second copy of the same UNet (inductor's cache serves
                # most of that compile): expect about half of (b)'s case.
                if time.perf_counter() + 0.5 * (time.perf_counter() - case_started) - started > args.budget_s:
                    print(f"skipped (t) tuned batch {size} compile {'on' if compiled else 'off'}: it would end past "
                          f"--budget-s {args.budget_s:.0f}")
                    continue
                t0 = time.perf_counter()
                tuned = tuned_pipeline(model, bank, args.device, compiled)
                seconds, failed = tuned_loop(tuned, plan, sources, size, args)
                failed_here += failed
                tuned_rate = rate(seconds, size, n)
                del tuned
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                report("(t) tuned", size, compiled, tuned_rate, bare,
                       f"   [b/t {ours / tuned_rate:.2f}; first batch (compiling, if on) {seconds[0]:.0f} s; "
                       f"set-up {time.perf_counter() - t0 - sum(seconds):.0f} s]")
                results.add("b_vs_tuned", f"batch {size} compile {'on' if compiled else 'off'}",
                            round(ours / tuned_rate, 3))
            bare_rates[size] = bare  # a batch size that ran out of memory is not one (c) can run
            return failed_here

        for size in args.batch_sizes:
            if time.perf_counter() - started > args.budget_s * 0.8:
                print(f"skipped batch {size}: past 80% of --budget-s {args.budget_s:.0f}")
                continue
            failed, fitted = halving(batch_case, size)
            failures += failed
            if fitted != size:
                results.add("halved_batches", str(size), fitted)
        if importlib.util.find_spec("ray") is None or args.no_system:
            print("(c) system: skipped (" + ("--no-system" if args.no_system else "Ray is not installed here") + ")")
        else:
            size = max(bare_rates, default=args.batch_sizes[0])
            del pipe
            c = system_case(work, dataset, model, bank, size, size * 8, args)  # 4 shards of 2 batches
            report("(c) system", size, False, c["steady_images_per_s"], bare_rates.get(size),
                   f"   [wall {c['wall_s']:.0f} s, start-up {c['startup_s']:.0f} s]")
        print(f"done in {time.perf_counter() - started:.0f} s; failed pairs: {failures}")
        results.update(failed_pairs=failures)
    if failures:
        print("FAIL: some pairs failed (NaN/black outputs): the figures above skip their encoding work")
        sys.exit(1)


if __name__ == "__main__":
    bench.main(measure, device_of)
