"""train-cls ingest benchmark: training images/s with Ray Data ingest (the real train-cls path)
vs. the same model, optimizer and batch size fed from pre-decoded in-memory tensors, in one run.

    .venv/bin/python bench/bench_classify.py [--arch resnet18] [--img-size 64] [--batch-size 32]

Prints figures; asserts nothing. Target: ingest/in-memory >= 0.8 on this CPU."""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F


def in_memory_rate(dataset: str, arch: str, img_size: int, batch_size: int, steps: int, threads: int) -> float:
    from PIL import Image

    from diffmix_ray import canonical
    from diffmix_ray.classify.data import _transform
    from diffmix_ray.classify.model import build_model, data_config

    torch.set_num_threads(threads)
    d = data_config(arch, img_size)
    tf = _transform(d["img_size"], True, tuple(d["mean"]), tuple(d["std"]), d["interpolation"], d["crop_pct"])
    train = canonical.open_dataset(dataset).read_split("train")
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in train.column("image").to_pylist()])
    y = torch.tensor(train.column("label").to_pylist())
    model = build_model(arch, int(y.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    done, t0 = 0, None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps, as the first epoch of the ingest run is excluded
            t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (batch_size,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += batch_size if step >= 2 else 0
    return done / (time.perf_counter() - t0)


def ingest_rate(dataset: str, out: str, arch: str, img_size: int, batch_size: int, epochs: int, threads: int) -> tuple[float, list]:
    import ray

    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_classify

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    m = run_classify(ClassifyConfig(dataset=dataset, arch=arch, out=out, img_size=img_size, epochs=epochs,
                                    batch_size=batch_size, lr=0.01, cpus_per_worker=threads, warmup_epochs=0))
    rates = [e["images_per_s"] for e in m["epochs"]]
    return float(np.mean(rates[1:])), rates  # epoch 0 includes worker start-up and JIT warm-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import write_sample_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        raw = write_sample_imagefolder(os.path.join(tmp, "raw"), num_classes=4, per_class=args.per_class, size=96)
        ds = os.path.join(tmp, "ds")
        prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0.1), ds, show_progress=False)
        n_train = int(args.per_class * 4 * 0.9)
        steps = max(10, (n_train // args.batch_size) * (args.epochs - 1))
        # In-memory before and after the Ray run (which starts and leaves daemons): the mean is the
        # floor, the spread says how steady the machine was.
        before = in_memory_rate(ds, args.arch, args.img_size, args.batch_size, steps, args.threads)
        ingest, per_epoch = ingest_rate(ds, os.path.join(tmp, "run"), args.arch, args.img_size, args.batch_size,
                                        args.epochs, args.threads)
        after = in_memory_rate(ds, args.arch, args.img_size, args.batch_size, steps, args.threads)
        memory = (before + after) / 2
    result = {"arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size,
              "ingest_images_per_s": round(ingest, 2), "in_memory_images_per_s": round(memory, 2),
              "in_memory_before_after": [round(before, 2), round(after, 2)],
              "ratio_ingest_over_memory": round(ingest / memory, 3), "ingest_per_epoch": [round(r, 2) for r in per_epoch]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
