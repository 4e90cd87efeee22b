"""CUDA smoke test: the reduced-precision paths that only a GPU runs, one PASS/FAIL line each.
No Ray; about 2-3 minutes on one GPU (most of it writing the sd15 model once).

  finetune bf16            3 steps: finite loss, the class tokens and LoRA move, the vocabulary
                           does not
  finetune fp16            the same in fp16 with the grad scaler: 3 steps it did not skip (dynamic
                           loss scaling starts at 65,536 and skips the steps whose gradients overflow)
  finetune resume          checkpoint save -> load into a fresh fine-tuner -> the next step gives
                           the weights of the run that never stopped, to 1% of what the step moved
                           them (SDPA's backward on CUDA is not bitwise deterministic)
  translate fp16           img2img with a concept bank, pairs of several strengths: finite, non-black
  translate invariance     8 pairs of one strength, translated together (one device batch of 8) and
                           each alone: the same images within fp16 tolerance
  classifier amp bf16/fp16 the classifier step (uint8 in, channels_last) under autocast on a fixed
                           batch: the loss falls; evaluation under autocast
  classifier gpu-decode    nvJPEG + transforms.v2 on 4:4:4 JPEGs (nvJPEG upsamples 4:2:0 chroma
                           differently from libjpeg): shapes, and eval pixels within 2 levels of PIL's

    python bench/gpu_smoke.py [--preset sd15 | --model DIR] [--device cuda] [--json PATH]

Exits 1 if any item fails; the checks go to bench/results/ (--json) as they finish. `--device cpu
--preset tiny` runs the same checks on a CPU (bf16 where the CPU has it; fp16 items are skipped there)."""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from _harness import Bench, Results, device_label, workdir  # beside this file
from _inputs import model_folder, random_bank, sample_dataset

RESULTS: list[tuple[str, bool, str]] = []
JSON = Results(None)
FP16_STEPS_WANTED, FP16_STEPS_MAX = 3, 24  # 65,536 halves to 1 in 16 skipped steps
RESUME_RTOL = 1e-2


def check(name: str):
    """Run the decorated check now; record PASS/FAIL with its detail line (or the exception)."""
    def run(fn):
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        seconds = time.perf_counter() - t
        RESULTS.append((name, ok, detail))
        JSON.add("checks", name, {"ok": bool(ok), "detail": detail, "s": round(seconds, 1)})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<24} {detail}  ({seconds:.0f} s)", flush=True)
        return fn
    return run


def make_inputs(work: str, preset: str, device: str, model: str | None = None):
    """(model folder, dataset, concept bank); the model is written unless `model` names a folder."""
    from diffmix_ray.models.loader import resolve_model

    model = model_folder(work, preset, device, model)
    dataset = sample_dataset(work, 4, 4, resolve_model(model).resolution)
    return model, dataset, random_bank(work, model, dataset)


def finetune_checks(model: str, dataset: str, work: str, device: torch.device, precisions: list[str]) -> None:
    from diffmix_ray.finetune import run as ft_run
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.finetune.data import COL_KEY, local_batches
    from diffmix_ray.finetune.loop import Finetuner, Progress

    def config(precision: str) -> FinetuneConfig:
        return FinetuneConfig(dataset=dataset, out=os.path.join(work, "ft"), model=model, max_steps=4, batch_size=2,
                              precision=precision, gpus_per_worker=1.0 if device.type == "cuda" else 0.0, lr=1e-3,
                              ti_lr=5e-3, rank=4)

    inputs = ft_run.resolve_inputs(config("fp32"))
    batches = [b for _, b in zip(range(4), next(local_batches(inputs.dataset, inputs.model.resolution, 2, False, 0)))]

    def tuner(precision: str) -> Finetuner:
        return Finetuner(config(precision), inputs.prompts, inputs.tokens, inputs.init_ids, device)

    def three_steps(precision: str) -> tuple[bool, str]:
        t = tuner(precision)
        vocab = t.class_tokens.base.weight.clone()
        start = {k: v.clone() for k, v in t.trainable_tensors().items()}  # on a CPU they are views
        losses, skipped = effective_steps(t, batches, FP16_STEPS_WANTED, FP16_STEPS_MAX)
        moved = {k: float((v - start[k]).abs().max()) for k, v in t.trainable_tensors().items()}
        tokens = min(v for k, v in moved.items() if k.startswith("embed."))
        lora = min(v for k, v in moved.items() if k.startswith("lora."))
        frozen = torch.equal(vocab, t.class_tokens.base.weight)
        taken = len(losses) - skipped
        ok = bool(np.isfinite(losses).all()) and tokens > 0 and lora > 0 and frozen and taken >= FP16_STEPS_WANTED
        scale = f", grad scale {t.scaler.get_scale():.0f}, {skipped} step(s) skipped" if t.scaler.is_enabled() else ""
        return ok, (f"weights {t.weight_dtype}, {taken} steps taken, losses {[round(x, 4) for x in losses]}, token "
                    f"move {tokens:.2e}, LoRA move {lora:.2e}, vocabulary frozen {frozen}{scale}")

    for precision in precisions:
        check(f"finetune {precision}")(lambda p=precision: three_steps(p))

    @check("finetune resume")
    def resume():
        precision = precisions[0]
        first = tuner(precision)
        progress = Progress()
        for step, b in enumerate(batches[:2], start=1):
            first.train_step(b, step)
            progress.add_step(step, b[COL_KEY])
        folder = tempfile.mkdtemp(dir=work)
        first.save(folder, progress, rank=0)
        saved = first.trainable_tensors()
        second = tuner(precision)
        restored = second.load(folder, rank=0)
        torch.manual_seed(7)
        first.train_step(batches[2], 3)
        torch.manual_seed(7)
        second.train_step(batches[2], 3)
        gap = resume_gap(saved, first.trainable_tensors(), second.trainable_tensors())
        return restored.step == 2 and gap <= RESUME_RTOL, (
            f"{precision}: restored step {restored.step}; after the next step the resumed weights differ by "
            f"{gap:.1e} of what the step moved them (limit {RESUME_RTOL:g})")


def effective_steps(tuner, batches: list, want: int, limit: int) -> tuple[list[float], int]:
    """Train steps until `want` of them were taken (a GradScaler skips the steps whose gradients
    overflowed, and halves its scale: the scale falls), at most `limit`. Returns (losses, skipped)."""
    losses, skipped, step = [], 0, 0
    while len(losses) - skipped < want and step < limit:
        step += 1
        before = tuner.scaler.get_scale() if tuner.scaler.is_enabled() else None
        losses.append(float(tuner.train_step(batches[(step - 1) % len(batches)], step)))
        if before is not None and tuner.scaler.get_scale() < before:
            skipped += 1
    return losses, skipped


def resume_gap(before: dict, first: dict, second: dict) -> float:
    """How far a resumed run's next step lands from the uninterrupted run's: ||second - first|| over
    ||first - before|| (the step's own movement), over all trainable tensors. 0 when bitwise equal;
    near 1 or more when the resume lost state (e.g. the optimizer's moments)."""
    gap = sum(float((second[k] - first[k]).double().pow(2).sum()) for k in first)
    moved = sum(float((first[k] - before[k]).double().pow(2).sum()) for k in first)
    return (gap / moved) ** 0.5 if moved > 0 else (0.0 if gap == 0 else float("inf"))


def translate_checks(model: str, dataset: str, bank: str, device: str) -> None:
    from diffmix_ray import canonical
    from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
    from diffmix_ray.generate.cpu_stages import COL_ERROR, COL_PIXELS, decode_sources
    from diffmix_ray.generate.translate import Translator

    ds = canonical.open_dataset(dataset)
    train = ds.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE, COL_LABEL])
    n = 8
    sources = train.column(COL_IMAGE).to_pylist()[:n]
    translator = Translator(model, "mix", ds.info.classes, ds.info.super_class, concepts=bank, device=device)
    resolution = translator.resolution
    device_batches = record_device_batches(translator)
    mixed = translator(decode_sources(smoke_plan(train, ds.info.num_classes, n, [0.7, 0.5, 0.9, 0.7, 0.3, 0.7, 0.5,
                                                                                  0.9]), sources, resolution))

    @check(f"translate {translator.dtype}".replace("torch.", ""))
    def outputs():
        errors = [e for e in mixed[COL_ERROR] if e]
        px = mixed[COL_PIXELS]
        return not errors, f"{n} pairs at {resolution}px: errors {errors or 'none'}, pixel mean {px.mean():.1f}, " \
                           f"std {px.std():.1f}"

    @check("translate invariance")
    def invariance():
        # One strength: the translator batches pairs by their number of denoising steps, so only pairs
        # of one strength run together in one device batch.
        batch = decode_sources(smoke_plan(train, ds.info.num_classes, n, [0.7] * n), sources, resolution)
        device_batches.clear()
        together = translator(batch)
        sizes = list(device_batches)
        diffs = []
        for i in range(n):
            alone = translator({k: v[i:i + 1] for k, v in batch.items()})[COL_PIXELS][0]
            diffs.append(np.abs(alone.astype(np.int16) - together[COL_PIXELS][i].astype(np.int16)))
        mean = max(float(d.mean()) for d in diffs)
        worst = max(int(d.max()) for d in diffs)
        errors = [e for e in together[COL_ERROR] if e]
        # fp16 rounds differently in a batch of 8 than alone; 17 steps can amplify it a little
        return mean <= 2.0 and sizes == [n] and not errors, (
            f"together: device batches {sizes}; per pair: worst mean |diff| {mean:.2f} levels, worst pixel {worst}"
            + (f"; errors {errors}" if errors else ""))


def smoke_plan(train, num_classes: int, n: int, strengths: list[float]) -> dict:
    """n diff-mix pairs over the first n training images, in the plan's columns."""
    from diffmix_ray.contracts import COL_IMAGE_ID, COL_LABEL

    labels = train.column(COL_LABEL).to_pylist()[:n]
    return {"pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "source_id": np.array(train.column(COL_IMAGE_ID).to_pylist()[:n], dtype=object),
            "source_label": np.array(labels, dtype=np.int32),
            "target_label": np.array([(c + 1) % num_classes for c in labels], dtype=np.int32),
            "strength": np.array(strengths, dtype=np.float32),
            "seed": np.arange(100, 100 + n, dtype=np.int64), "mode": np.array(["diff-mix"] * n, dtype=object)}


def record_device_batches(translator) -> list[int]:
    """The sizes of the device batches `translator` runs from now on (appended as they run)."""
    sizes: list[int] = []
    inner = translator.translate

    def translate(pixels, labels, seeds, n_steps):
        sizes.append(len(labels))
        return inner(pixels, labels, seeds, n_steps)

    translator.translate = translate
    return sizes


def smoke_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n 500x375 JPEGs (quality 95) with 4:4:4 chroma: nvJPEG and libjpeg upsample subsampled chroma
    differently (nvJPEG nearest-neighbour, ~1.2 levels apart on 4:2:0 from that alone), which is not
    what the decode check is about."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.clip(np.mgrid[0:375, 0:500][1][..., None] * [0.5, 0.3, 0.2] + rng.normal(0, 10, (375, 500, 3)),
                      0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95, subsampling=0)  # 0 = 4:4:4
        out.append(buf.getvalue())
    return out


def classifier_checks(device: str, amp_dtypes: list[torch.dtype]) -> None:
    """The project's classifier step (classify/step.py: uint8 in, normalised and labelled on the device,
    channels_last for the CNN on CUDA) and its --gpu-decode path."""
    from diffmix_ray.classify import step
    from diffmix_ray.classify.losses import soft_ce
    from diffmix_ray.classify.model import build_model
    from diffmix_ray.classify.transforms import IMAGENET_MEAN, IMAGENET_STD

    dev = torch.device(device)
    for amp in amp_dtypes:
        @check(f"classifier amp {str(amp).replace('torch.', '')}")
        def steps(amp=amp):
            torch.manual_seed(0)
            model = build_model("resnet50" if device == "cuda" else "resnet18", 10).to(dev)
            channels_last = step.use_channels_last(model, dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            side = 224 if device == "cuda" else 64
            d = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "img_size": side}
            inputs = step.Inputs(d, dev, 10, channels_last=channels_last)
            y = torch.randint(0, 10, (16,), device=dev)
            batch = {"image": torch.randint(0, 256, (16, side, side, 3), dtype=torch.uint8, device=dev),
                     "source": y, "label": y, "strength": torch.zeros(16, device=dev)}
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
            losses = [float(step.train_step(model, batch, inputs, opt, scaler, lambda lg, t, lb: soft_ce(lg, t), 1e-3,
                                            amp)) for _ in range(25)]
            correct = torch.zeros(10, dtype=torch.float64, device=dev)
            total = torch.zeros_like(correct)
            model.eval()
            step.count_correct(model, batch, inputs, correct, total, amp)  # evaluation under the same autocast
            ok = np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0] and float(total.sum()) == 16
            return ok, (f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 25 steps, channels_last {channels_last}, "
                        f"eval {float(correct.sum()):.0f}/16 on the fitted batch")

    check("classifier gpu-decode")(lambda: decode_check(dev))


def decode_check(dev: torch.device) -> tuple[bool, str]:
    """--gpu-decode's path (nvJPEG on CUDA, torchvision's decoder on a CPU + transforms.v2) against the
    data workers' PIL path, on the same 4:4:4 JPEGs, at evaluation (no random augmentation)."""
    from diffmix_ray.classify import gpu_decode, step
    from diffmix_ray.classify.transforms import data_config, pipeline, tensor_augmentations
    from diffmix_ray.images import decode_rgb

    jpegs = smoke_jpegs(8)
    d = data_config("resnet50", "reference", None, 448)
    decoded = gpu_decode.decode(jpegs, dev)
    pixels = gpu_decode.augment(decoded, tensor_augmentations(d, False))
    cpu = np.stack([pipeline(d, False)(decode_rgb(b)) for b in jpegs])
    diff = float(np.abs(pixels.permute(0, 2, 3, 1).cpu().numpy().astype(int) - cpu.astype(int)).mean())
    inputs = step.Inputs(d, dev, 10, gpu_decode=True, channels_last=dev.type == "cuda")
    x, y = inputs({"image": jpegs, "source": torch.zeros(8, dtype=torch.long, device=dev),
                   "label": torch.zeros(8, dtype=torch.long, device=dev), "strength": torch.zeros(8, device=dev)})
    ok = (decoded[0].device.type == dev.type and tuple(x.shape) == (8, 3, 448, 448) and x.dtype == torch.float32
          and diff < 2.0)
    return ok, f"decoded on {decoded[0].device}, input {tuple(x.shape)}, eval pixels vs PIL: mean |diff| {diff:.2f}"


bench = Bench("gpu-smoke", __doc__)
bench.parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
bench.parser.add_argument("--preset", default=None, help="model preset (default sd15 on cuda, tiny on cpu)")
bench.parser.add_argument("--model", default=None, help="a model folder to use instead of writing the preset")
bench.parser.add_argument("--work", default=None)


def measure(args, results) -> None:
    global JSON
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    preset = args.preset or ("sd15" if cuda else "tiny")
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    JSON = results
    JSON.update(device=device_name, torch=torch.__version__, model=args.model or preset)
    with workdir(args.work, "gpu-smoke-") as work:
        print(f"{device_name}; torch {torch.__version__}; model {args.model or preset}", flush=True)
        model, dataset, bank = make_inputs(work, preset, args.device, args.model)
        print(f"inputs written in {time.perf_counter() - started:.0f} s", flush=True)
        precisions = (["bf16"] if not cuda or torch.cuda.is_bf16_supported() else []) + (["fp16"] if cuda else [])
        finetune_checks(model, dataset, work, torch.device(args.device), precisions)
        translate_checks(model, dataset, bank, args.device)
        classifier_checks(args.device, [torch.bfloat16] + ([torch.float16] if cuda else []))
    failed = [name for name, ok, _ in RESULTS if not ok]
    JSON.update(passed=len(RESULTS) - len(failed), failed=failed)
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    bench.main(measure, lambda args: device_label(args.device))
