"""CUDA smoke test: the reduced-precision paths that only a GPU runs, one PASS/FAIL line each.
No Ray; about 2-3 minutes on one GPU (most of it writing the sd15 model once).

  finetune bf16            3 steps: finite loss, the class tokens and LoRA move, the vocabulary
                           does not
  finetune fp16            the same in fp16 with the grad scaler
  finetune resume          checkpoint save -> load into a fresh fine-tuner -> the next step
                           gives the same weights as the run that never stopped
  translate fp16           img2img with a concept bank: finite, non-black outputs
  translate invariance     each pair alone gives its image in the batch (fp16 tolerance)
  classifier amp bf16/fp16 timm steps under autocast on a fixed batch: the loss falls

    python bench/gpu_smoke.py [--preset sd15] [--device cuda]

Exits 1 if any item fails. `--device cpu --preset tiny` runs the same checks on a CPU (bf16
where the CPU has it; fp16 items are skipped there)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    """Run the decorated check now; record PASS/FAIL with its detail line (or the exception)."""
    def run(fn):
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        RESULTS.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<24} {detail}  ({time.perf_counter() - t:.0f} s)", flush=True)
        return fn
    return run


def make_inputs(work: str, preset: str, device: str):
    from diffmix_ray import canonical
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder
    from diffmix_ray.models.concepts import write_random_bank
    from diffmix_ray.models.loader import resolve_model, write_model

    model = write_model(preset, os.path.join(work, "model"), dtype="float16" if device == "cuda" else "float32")
    side = resolve_model(model).resolution
    raw = write_sample_imagefolder(os.path.join(work, "raw"), num_classes=4, per_class=4, size=side)
    dataset = os.path.join(work, "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=SAMPLE_SUPER_CLASS, val_fraction=0.0), dataset,
            show_progress=False)
    info = canonical.open_dataset(dataset).info
    bank = write_random_bank(os.path.join(work, "bank"), model, info.classes, info.super_class, info.fingerprint,
                             lora_std=0.02)
    return model, dataset, bank


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
        losses = [float(t.train_step(b, step)) for step, b in enumerate(batches[:3], start=1)]
        moved = {k: float((v - start[k]).abs().max()) for k, v in t.trainable_tensors().items()}
        tokens = min(v for k, v in moved.items() if k.startswith("embed."))
        lora = min(v for k, v in moved.items() if k.startswith("lora."))
        frozen = torch.equal(vocab, t.class_tokens.base.weight)
        ok = bool(np.isfinite(losses).all()) and tokens > 0 and lora > 0 and frozen
        scale = f", grad scale {t.scaler.get_scale():.0f}" if t.scaler.is_enabled() else ""
        return ok, (f"weights {t.weight_dtype}, losses {[round(x, 4) for x in losses]}, token move {tokens:.2e}, "
                    f"LoRA move {lora:.2e}, vocabulary frozen {frozen}{scale}")

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
        second = tuner(precision)
        restored = second.load(folder, rank=0)
        torch.manual_seed(7)
        first.train_step(batches[2], 3)
        torch.manual_seed(7)
        second.train_step(batches[2], 3)
        a, b = first.trainable_tensors(), second.trainable_tensors()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        return restored.step == 2 and worst <= 1e-6, f"{precision}: restored step {restored.step}, max |diff| after " \
                                                     f"the next step {worst:.1e}"


def translate_checks(model: str, dataset: str, bank: str, device: str) -> None:
    from diffmix_ray import canonical
    from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
    from diffmix_ray.generate.cpu_stages import COL_ERROR, COL_PIXELS, decode_sources
    from diffmix_ray.generate.translate import Translator

    ds = canonical.open_dataset(dataset)
    train = ds.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE, COL_LABEL])
    n = 8
    labels = train.column(COL_LABEL).to_pylist()[:n]
    plan = {"pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "source_id": np.array(train.column(COL_IMAGE_ID).to_pylist()[:n], dtype=object),
            "source_label": np.array(labels, dtype=np.int32),
            "target_label": np.array([(c + 1) % ds.info.num_classes for c in labels], dtype=np.int32),
            "strength": np.array([0.7, 0.5, 0.9, 0.7, 0.3, 0.7, 0.5, 0.9], dtype=np.float32),
            "seed": np.arange(100, 100 + n, dtype=np.int64), "mode": np.array(["diff-mix"] * n, dtype=object)}
    translator = Translator(model, "mix", ds.info.classes, ds.info.super_class, concepts=bank, device=device)
    resolution = translator.resolution
    batch = decode_sources(plan, train.column(COL_IMAGE).to_pylist()[:n], resolution)
    together = translator(batch)

    @check(f"translate {translator.dtype}".replace("torch.", ""))
    def outputs():
        errors = [e for e in together[COL_ERROR] if e]
        px = together[COL_PIXELS]
        return not errors, f"{n} pairs at {resolution}px: errors {errors or 'none'}, pixel mean {px.mean():.1f}, " \
                           f"std {px.std():.1f}"

    @check("translate invariance")
    def invariance():
        diffs = []
        for i in range(n):
            alone = translator({k: v[i:i + 1] for k, v in batch.items()})[COL_PIXELS][0]
            diffs.append(np.abs(alone.astype(np.int16) - together[COL_PIXELS][i].astype(np.int16)))
        mean = max(float(d.mean()) for d in diffs)
        worst = max(int(d.max()) for d in diffs)
        # fp16 rounds differently in a batch of 8 than alone; 17 steps can amplify it a little
        return mean <= 2.0, f"per pair: worst mean |diff| {mean:.2f} levels, worst pixel {worst}"


def classifier_checks(device: str, amp_dtypes: list[torch.dtype]) -> None:
    from diffmix_ray.classify.model import build_model

    for amp in amp_dtypes:
        @check(f"classifier amp {str(amp).replace('torch.', '')}")
        def steps(amp=amp):
            torch.manual_seed(0)
            model = build_model("resnet50" if device == "cuda" else "resnet18", 10).to(device)
            model = model.to(memory_format=torch.channels_last)
            side = 224 if device == "cuda" else 64
            x = torch.randn(16, 3, side, side, device=device).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (16,), device=device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
            losses = []
            for _ in range(25):
                with torch.autocast(device, dtype=amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss))
            ok = np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
            return ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 25 steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="model preset (default sd15 on cuda, tiny on cpu)")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    preset = args.preset or ("sd15" if cuda else "tiny")
    work = args.work or tempfile.mkdtemp(prefix="gpu-smoke-")
    started = time.perf_counter()
    try:
        print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; preset {preset}",
              flush=True)
        model, dataset, bank = make_inputs(work, preset, args.device)
        print(f"inputs written in {time.perf_counter() - started:.0f} s", flush=True)
        precisions = (["bf16"] if not cuda or torch.cuda.is_bf16_supported() else []) + (["fp16"] if cuda else [])
        finetune_checks(model, dataset, work, torch.device(args.device), precisions)
        translate_checks(model, dataset, bank, args.device)
        classifier_checks(args.device, [torch.bfloat16] + ([torch.float16] if cuda else []))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
