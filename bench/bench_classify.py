"""train-cls ingest benchmark: training images/s with Ray Data ingest (the real train-cls path: Ray
Train worker, Ray Data tasks decoding and augmenting into uint8, the step of classify/step.py) vs.
the same model, optimizer, batch size, threads and step fed from memory (the same uint8 batches,
pre-augmented), in one run.

    .venv/bin/python bench/bench_classify.py                                   # here: ~3 min on 2 cores
    python bench/bench_classify.py --arch resnet50 --augment reference --res-mode 448 --batch-size 64 \\
        --per-class 200 --gpus 1                                               # a GPU node with Ray

Prints figures and writes them to bench/results/ (--json); asserts nothing. Target: ingest/in-memory
>= 0.9. Figures are medians over epochs: the ingest run's epochs after the first (which includes the
pipeline's start), and as many epochs' worth of in-memory steps before and after the Ray run (which
starts and leaves daemons); the spread of the in-memory rounds says how steady the machine was. On a
shared machine a neighbour's load moves both, and not alike: a Ray run has more threads to claim a
share of the cores with."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

from _harness import Bench, Rounds, TreeSampler, timed  # beside this file
from _inputs import sample_dataset


def in_memory_rates(dataset: str, args, steps: int, rounds: int) -> tuple[list[float], list[float]]:
    """The worker's step (step.train_step: uint8 in, normalised and labelled on the device) on
    batches already augmented and held in memory: no data path at all."""
    from diffmix_ray import canonical
    from diffmix_ray.classify import step
    from diffmix_ray.classify.losses import Criterion
    from diffmix_ray.classify.model import build_model
    from diffmix_ray.classify.transforms import data_config, pipeline
    from diffmix_ray.images import decode_rgb

    device = torch.device("cuda" if args.gpus else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    d = data_config(args.arch, args.augment, args.img_size if args.augment == "timm" else None,
                    args.res_mode if args.augment != "timm" else None)
    train = canonical.open_dataset(dataset).read_split("train")
    tf = pipeline(d, True)
    pixels = torch.from_numpy(np.stack([tf(decode_rgb(b)) for b in train.column("image").to_pylist()]))
    labels = torch.tensor(train.column("label").to_pylist())
    C = int(labels.max()) + 1
    model = build_model(args.arch, C).to(device)
    channels_last = step.use_channels_last(model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = step.autocast_dtype(device)
    inputs = step.Inputs(d, device, C, 0.5, 0.1, channels_last)  # the run's defaults: gamma 0.5, smoothing 0.1
    # the run's defaults: SGD, momentum 0.9, weight decay 5e-4; cross-entropy on soft targets
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    loss_fn = Criterion("ce", np.bincount(labels.numpy(), minlength=C).tolist()).to(device).for_epoch(0)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            idx = torch.randint(0, len(pixels), (args.batch_size,), generator=g)
            yield {"image": pixels[idx].to(device), "source": labels[idx].to(device), "label": labels[idx].to(device),
                   "strength": torch.zeros(args.batch_size, device=device)}

    it = batches()

    def epoch(steps: int) -> None:  # the steps read once at the end, as an epoch is
        step.mean_loss(step.train_epoch(model, it, steps, inputs, opt, scaler, loss_fn, lambda s: 0.01, 0, amp))

    timed(lambda: epoch(2))  # warm-up
    r = Rounds({"in_memory": epoch}, items_per_step=args.batch_size)
    r.run(rounds, steps)  # one epoch's steps each
    return r.wall["in_memory"], r.cpu["in_memory"]


def ingest_rate(dataset: str, out: str, args) -> tuple[float, list, list]:
    import ray

    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_classify

    if not ray.is_initialized():
        from diffmix_ray.runtime.local_ray import start_private_ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        start_private_ray(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    sampler = TreeSampler()  # this process and all it starts: Ray's daemons, the Train worker, the Ray Data workers
    m = run_classify(ClassifyConfig(
        dataset=dataset, arch=args.arch, out=out, augment=args.augment,
        img_size=args.img_size if args.augment == "timm" else None,
        res_mode=args.res_mode if args.augment != "timm" else None, epochs=args.epochs, batch_size=args.batch_size,
        lr=0.01, cpus_per_worker=args.threads, warmup_epochs=0, gpus_per_worker=float(args.gpus)))
    sampler.stop()
    rates = [e["images_per_s"] for e in m["epochs"]]
    # CPU seconds everything spent while each epoch trained (evaluation excluded)
    cpu = [e["images_per_s"] * e["train_seconds"] / max(sampler.between(e["started_at"], e["started_at"] +
                                                                           e["train_seconds"]), 1e-9)
           for e in m["epochs"]]
    return float(np.median(rates[1:])), rates, cpu  # epoch 0 includes the pipeline's start and warm-up


bench = Bench("classify", __doc__)
ap = bench.parser
ap.add_argument("--arch", default="resnet18")
ap.add_argument("--augment", default="timm", help="timm | reference | reference-lt")
ap.add_argument("--img-size", type=int, default=64, help="--augment timm: input size")
ap.add_argument("--res-mode", type=int, default=224, help="reference pipelines: 224 | 384 | 448")
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--per-class", type=int, default=80, help="images per class (4 classes; 10%% go to val)")
ap.add_argument("--source-size", type=int, default=96, help="side of the sample images")
ap.add_argument("--epochs", type=int, default=4)
ap.add_argument("--threads", type=int, default=2, help="CPUs per worker (torch threads on CPU)")
ap.add_argument("--gpus", type=int, default=0, help="1: train on a GPU (the in-memory floor too)")
ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the private Ray")


def measure(args, results) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ds = sample_dataset(tmp, 4, args.per_class, args.source_size, val_fraction=0.1)
        steps = max(2, int(args.per_class * 4 * 0.9) // args.batch_size)  # one epoch
        before, before_cpu = in_memory_rates(ds, args, steps, args.epochs - 1)
        results.update(in_memory_before=[round(r, 2) for r in before])
        ingest, per_epoch, ingest_cpu = ingest_rate(ds, os.path.join(tmp, "run"), args)
        results.update(ingest_per_epoch=[round(r, 2) for r in per_epoch])
        after, after_cpu = in_memory_rates(ds, args, steps, args.epochs - 1)
        memory = float(np.median(before + after))
        memory_cpu, ingest_cpu_med = float(np.median(before_cpu + after_cpu)), float(np.median(ingest_cpu[1:]))
    result = {"arch": args.arch, "augment": args.augment, "batch_size": args.batch_size,
              "threads": args.threads, "gpus": args.gpus, "load": round(os.getloadavg()[0], 1),
              "ingest_images_per_s": round(ingest, 2), "in_memory_images_per_s": round(memory, 2),
              "in_memory_before": [round(r, 2) for r in before], "in_memory_after": [round(r, 2) for r in after],
              "ratio_ingest_over_memory": round(ingest / memory, 3),
              "ingest_per_epoch": [round(r, 2) for r in per_epoch],
              # per CPU second of everything involved: what a neighbour's load moves least
              "ingest_images_per_cpu_s": round(ingest_cpu_med, 2), "in_memory_images_per_cpu_s": round(memory_cpu, 2),
              "cpu_ratio_ingest_over_memory": round(ingest_cpu_med / memory_cpu, 3),
              "ingest_per_cpu_s_per_epoch": [round(r, 2) for r in ingest_cpu],
              "wall_s": round(time.perf_counter() - started, 1)}
    results.update(**result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    bench.main(measure, lambda args: "gpu" if args.gpus else "cpu")
