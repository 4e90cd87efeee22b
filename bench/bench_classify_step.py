"""train-cls step benchmark, without Ray: training images/s of the classifier step (classify/step.py,
what a Ray Train worker runs) fed from memory in the ways the data path can feed it, against a bare
loop, measured side by side in one process.

    python bench/bench_classify_step.py --device cuda      # one GPU: ResNet-50, 448 px, AMP; ~1-2 min
    .venv/bin/python bench/bench_classify_step.py --device cpu   # here: ResNet-18, 224 px, fp32; ~2-3 min

Variants (--variants, comma-separated):
  bare         the floor: normalised float images already on the device (channels_last on CUDA), hard
               labels, F.cross_entropy, the same optimizer; no input preparation at all
  float-host   the path before issue 12: normalised float32 NCHW images in host memory (what the data
               workers shipped), copied to the device each step; NCHW model
  uint8        uint8 NHWC pixels in pinned host memory, copied and normalised on the device (ToInput),
               soft labels made there; NCHW model
  uint8-cl     the same with channels_last (the default for CNNs on CUDA; forced here on CPU too)
  gpu-decode   JPEG bytes in host memory, decoded (nvJPEG on CUDA) and augmented (transforms.v2) on the
               device: --gpu-decode; this and the variants below lay the model out as a run would on
               the device (channels_last for a CNN on CUDA, not on CPU)
  cpu-decode   JPEG bytes decoded and augmented by PIL on --decode-threads host threads, a few batches
               ahead (the data workers' job, on the cores a GPU would have), then as uint8(-cl)
  eval-fp32, eval-amp   evaluation batches (uint8, channels_last as above): without and (CUDA only)
               under autocast

Every variant uses the same model (timm --arch, random weights), batch, optimizer (SGD, momentum 0.9)
and precision policy (CUDA: bf16 autocast where supported, else fp16 with a GradScaler; CPU: fp32).
The images are CUB-like: --images JPEGs of 500x375 with structure (gradients, shapes, noise), augmented
by the run's pipeline (--augment, --res-mode). Rounds of --steps steps run in turn for every variant,
each ending with one read of the losses (as an epoch does). Figures: median images/s over rounds, and
ratios to `bare` and `float-host`; on CPU also per second of this process's CPU time. A batch that runs
out of device memory is halved until it fits. Prints figures and writes them to bench/results/ (--json);
asserts nothing about timing. Imports nothing from Ray (checked at the end)."""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from _harness import Bench, Rounds, describe_device, device_label, halving, ratios, ray_modules, timed

VARIANTS = ("bare", "float-host", "uint8", "uint8-cl", "gpu-decode", "cpu-decode", "eval-fp32", "eval-amp")
DEFAULTS = {"cuda": dict(arch="resnet50", res_mode=448, batch_size=64, images=512),
            "cpu": dict(arch="resnet18", res_mode=224, batch_size=8, images=64)}


def cub_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """500x375 JPEGs (quality 95) with gradients, a few bright rectangles and noise: decoding and
    resizing cost what a photo costs, unlike flat colours or pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.2, 1.0, 2)
        arr = np.stack([xx * a * 0.5, yy * b * 0.6, (xx + yy) * 0.2 + 40], -1)
        for _ in range(3):
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            arr[y0:y0 + 60, x0:x0 + 90] = rng.uniform(0, 255, 3)
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


class HostFloatInputs:
    """The old path's batches: images already normalised float32 (on the host until the step copies
    them); only the labels are made on the device."""

    def __init__(self, inputs):
        self.inputs = inputs

    def images(self, batch, training):
        return batch["float"]

    def __call__(self, batch, training=True):
        from diffmix_ray.classify.step import soft_targets

        i = self.inputs
        return batch["float"], soft_targets(batch["source"], batch["label"], batch["strength"], i.gamma,
                                            i.num_classes, i.smoothing)


class Shared:
    """The model, optimizer and host batches all variants share."""

    def __init__(self, args, device: torch.device):
        from diffmix_ray.classify import step
        from diffmix_ray.classify.model import build_model
        from diffmix_ray.classify.transforms import data_config, pipeline
        from diffmix_ray.images import decode_rgb

        self.args, self.device, self.step = args, device, step
        self.d = data_config(args.arch, args.augment, args.res_mode if args.augment == "timm" else None,
                             None if args.augment == "timm" else args.res_mode)
        self.amp = step.autocast_dtype(device)
        torch.manual_seed(0)
        self.model = build_model(args.arch, args.classes).to(device)
        self.conv = step.is_convolutional(self.model)
        self.jpegs = cub_like_jpegs(args.images)
        tf = pipeline(self.d, True)  # the data workers' PIL path, run here once to make the uint8 batches
        pixels = np.stack([tf(decode_rgb(b)) for b in self.jpegs[:args.batch_size * args.host_batches]])
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for i in range(args.host_batches):
            u8 = torch.from_numpy(pixels[i * args.batch_size:(i + 1) * args.batch_size])
            labels = torch.randint(0, args.classes, (args.batch_size,), generator=g)
            jpegs = self.jpegs[i * args.batch_size:(i + 1) * args.batch_size]
            batch = {"image": u8, "source": labels, "label": labels, "strength": torch.zeros(args.batch_size),
                     "jpeg": jpegs}
            if device.type == "cuda":
                batch["image"] = u8.pin_memory()
            self.batches.append(batch)
        mean, std = (torch.tensor(self.d[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        # pageable, as the old path's batches were (iter_torch_batches without pin_memory)
        self.float_batches = [((b["image"].permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()
                              for b in self.batches]
        self.tf_cpu = tf

    def layout(self, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)

    def optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Variant:
    def __init__(self, name: str, b: Shared):
        from diffmix_ray.classify.losses import soft_ce

        s, dev = b.step, b.device
        self.name, self.b, self.s = name, b, s
        # named layouts as named, on any device; the rest as the run would lay them out on this device
        self.channels_last = {"bare": s.use_channels_last(b.model, dev), "float-host": False, "uint8": False,
                              "uint8-cl": True}.get(name, s.use_channels_last(b.model, dev))
        self.inputs = s.Inputs(b.d, dev, b.args.classes, 0.5, 0.1, self.channels_last, gpu_decode=name == "gpu-decode")
        if name == "float-host":
            self.inputs = HostFloatInputs(self.inputs)
        self.opt = b.optimizer() if not name.startswith("eval") else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=b.amp == torch.float16)
        self.loss = lambda logits, y, labels: soft_ce(logits, y)
        self.i = 0
        self.pool = ThreadPoolExecutor(b.args.decode_threads) if name == "cpu-decode" else None
        self.ahead: queue.Queue | None = None
        if name == "bare":
            self.ready = [self.inputs.to_input(bt["image"].to(dev), "NHWC") for bt in b.batches]
            self.labels = [bt["label"].to(dev) for bt in b.batches]

    # -- batches ---------------------------------------------------------------------------------
    def _next_host(self) -> dict:
        b = self.b.batches[self.i % len(self.b.batches)]
        if self.name == "float-host":
            b = b | {"float": self.b.float_batches[self.i % len(self.b.batches)]}
        self.i += 1
        return b

    def _decoded_on_cpu(self, k: int) -> dict:
        """One batch decoded and augmented by PIL on the pool's threads."""
        from diffmix_ray.images import decode_rgb

        n = self.b.args.batch_size
        jpegs = [self.b.jpegs[(k * n + j) % len(self.b.jpegs)] for j in range(n)]
        pixels = np.stack(list(self.pool.map(lambda data: self.b.tf_cpu(decode_rgb(data)), jpegs)))
        image = torch.from_numpy(pixels)
        if self.b.device.type == "cuda":
            image = image.pin_memory()
        base = self.b.batches[k % len(self.b.batches)]
        return base | {"image": image}

    def _producer(self, stop: threading.Event) -> None:
        k = 0
        while not stop.is_set():
            self.ahead.put(self._decoded_on_cpu(k))
            k += 1

    def start(self) -> None:
        if self.name == "cpu-decode" and self.ahead is None:  # decoding runs ahead, as Ray Data's workers do
            self.ahead, self._stop = queue.Queue(maxsize=4), threading.Event()
            self._thread = threading.Thread(target=self._producer, args=(self._stop,), daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self.ahead is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self.ahead.get_nowait()
                except queue.Empty:
                    time.sleep(0.01)
            self.pool.shutdown()

    def batch(self) -> dict:
        if self.name == "cpu-decode":
            return _to_device(self.ahead.get(), self.b.device)
        host = self._next_host()
        if self.name == "gpu-decode":
            return _to_device({k: v for k, v in host.items() if k != "image"}, self.b.device) | {"image": host["jpeg"]}
        skip = ("jpeg", "image") if self.name == "float-host" else ("jpeg",)
        return _to_device({k: v for k, v in host.items() if k not in skip}, self.b.device)

    # -- steps -----------------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        b, s = self.b, self.s
        losses = []
        if self.name.startswith("eval"):
            C = b.args.classes
            correct = torch.zeros(C, dtype=torch.float64, device=b.device)
            total = torch.zeros_like(correct)
            b.model.eval()
            for _ in range(steps):
                s.count_correct(b.model, self.batch(), self.inputs, correct, total,
                                b.amp if self.name == "eval-amp" else None)
            float(total.sum().cpu())
            return
        b.model.train()
        if self.name == "bare":
            for _ in range(steps):
                k = self.i % len(self.ready)
                self.i += 1
                with torch.autocast(b.device.type, dtype=b.amp or torch.float32, enabled=b.amp is not None):
                    loss = F.cross_entropy(b.model(self.ready[k]).float(), self.labels[k])
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                losses.append(loss.detach())
        else:
            for _ in range(steps):
                losses.append(s.train_step(b.model, self.batch(), self.inputs, self.opt, self.scaler, self.loss,
                                           1e-3, b.amp))
        s.mean_loss(losses)  # the round's one read, as an epoch's


def figures(names, rounds: Rounds, variants, warmup_s, device) -> dict:
    """Per variant: median images/s over the rounds so far, ratios to the references, and the rest."""
    refs = ("bare", "float-host", "eval-fp32")

    def same_kind(name, ref):  # training variants against training references, evaluation against evaluation
        return name.startswith("eval") == ref.startswith("eval")

    rates = rounds.median()
    rows = {}
    for name in names:
        row = {"images_per_s": round(rates[name], 1), "rounds": [round(r, 1) for r in rounds.wall[name]],
               "channels_last": variants[name].channels_last, "warmup_s": warmup_s[name]}
        row |= ratios(rates, name, refs, applies=same_kind)
        if device.type == "cpu":  # CPU time: what the step costs, whatever else the cores are doing
            cpu = rounds.median(cpu=True)
            row["images_per_cpu_s"] = round(cpu[name], 2)
            row |= ratios(cpu, name, refs, prefix="cpu_vs_", applies=same_kind)
        rows[name] = row
    return rows


bench = Bench("classify-step", __doc__)
ap = bench.parser
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--arch", default=None, help="timm architecture (default: resnet50 on CUDA, resnet18 on CPU)")
ap.add_argument("--augment", default="reference", help="timm | reference | reference-lt (default reference)")
ap.add_argument("--res-mode", type=int, default=None, help="reference: 224|384|448 (default 448 CUDA, 224 CPU); "
                                                          "timm: the input size")
ap.add_argument("--batch-size", type=int, default=None, help="per step (default 64 CUDA, 8 CPU)")
ap.add_argument("--classes", type=int, default=200, help="CUB-200: 200")
ap.add_argument("--images", type=int, default=None, help="distinct JPEGs to decode (default 512 CUDA, 64 CPU)")
ap.add_argument("--host-batches", type=int, default=2, help="distinct pre-augmented batches in memory")
ap.add_argument("--decode-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                help="cpu-decode: host threads decoding (the CPU cores a GPU would have)")
ap.add_argument("--steps", type=int, default=None, help="steps per round (default 10 CUDA, 2 CPU)")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--warmup", type=int, default=None, help="steps per variant before timing (default 5 CUDA, 1 CPU)")
ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
ap.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; "
                                                 "eval-amp on CUDA only)")


def measure(args, results) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_classify_step: --device {args.device}: torch {torch.__version__} sees no CUDA device; "
                 "use --device cpu")
    for k, v in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    args.images = max(args.images, args.batch_size * args.host_batches)
    default = [v for v in VARIANTS if device.type == "cuda" or v != "eval-amp"]
    names = bench.pick("--variants", args.variants, VARIANTS, default)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: the run's loop does the same

    started = time.perf_counter()
    results.update(device=describe_device(device), arch=args.arch, augment=args.augment, batch_size=args.batch_size,
                   classes=args.classes, decode_threads=args.decode_threads, steps_per_round=args.steps,
                   rounds=args.rounds, torch=torch.__version__)

    def at_batch(batch_size: int) -> None:
        a = argparse.Namespace(**vars(args) | {"batch_size": batch_size})
        results.update(batch_size=batch_size)
        b = Shared(a, device)
        results.update(img_size=b.d["img_size"], autocast=str(b.amp), setup_s=round(time.perf_counter() - started, 1))
        variants, warmup_s = {}, {}
        try:
            for name in names:
                v = variants[name] = Variant(name, b)
                b.layout(v.channels_last)
                v.start()
                # cudnn's algorithm search for this layout, the decoders' first calls
                warmup_s[name] = round(timed(lambda: v.run(a.warmup)), 2)
                print(f"{name}: warmed up ({warmup_s[name]:.1f} s)", flush=True)
            rounds = Rounds({name: variants[name].run for name in names}, items_per_step=a.batch_size,
                            before=lambda name: b.layout(variants[name].channels_last))
            rounds.run(a.rounds, a.steps, after_round=lambda r: results.update(
                variants=figures(names, rounds, variants, warmup_s, device), rounds_done=r + 1,
                wall_s=round(time.perf_counter() - started, 1)))
        finally:
            for v in variants.values():
                v.stop()

    halving(at_batch, args.batch_size)
    ray_loaded = ray_modules()
    results.update(
        peak_gpu_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        ray_imported=bool(ray_loaded), wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps({k: v for k, v in results.data.items() if k != "run"}, indent=2))
    if ray_loaded:
        sys.exit(f"bench_classify_step imported Ray ({ray_loaded[:3]}): it must run where Ray is not installed")


if __name__ == "__main__":
    bench.main(measure, lambda args: device_label(args.device))
