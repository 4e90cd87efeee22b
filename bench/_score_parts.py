"""Pieces shared by bench_score.py and bench_score_gpu.py: the benchmark's inputs, the hand-written
CLIP loop both compare against, and a CPU-time sampler for a process tree."""

from __future__ import annotations

import io
import os
import time

import numpy as np

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
    """A dataset of `train_images` 500x375 JPEGs and two generate outputs over it: `synthetic`
    (per_image pairs per source) and `synthetic-quarter` (its first quarter, whole shards)."""
    from PIL import Image

    from diffmix_ray import canonical
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
    quarter = shard_rows * max(1, len(rows) // shard_rows // 4)
    for name, part in (("synthetic", rows), ("synthetic-quarter", rows[:quarter])):
        write_synthetic(os.path.join(work, name), part, shard_rows, ds, per_image)
    return os.path.join(work, "synthetic")


def write_synthetic(synthetic: str, rows: list[dict], shard_rows: int, ds, per_image: int) -> None:
    """A finished generate output holding `rows`: shards, manifest.json, _SUCCESS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffmix_ray import storage
    from diffmix_ray.contracts import SHARD_SCHEMA

    os.makedirs(os.path.join(synthetic, "shards"))
    for i in range(0, len(rows), shard_rows):
        pq.write_table(pa.Table.from_pylist(rows[i:i + shard_rows], schema=SHARD_SCHEMA),
                       os.path.join(synthetic, "shards", f"shard-bench-{i // shard_rows:05d}.parquet"))
    storage.write_json_atomic(os.path.join(synthetic, "manifest.json"), {
        "identity": {"dataset": ds.uri, "bench": "bench_score", "per_image": per_image, "pairs": len(rows)},
        "dataset_fingerprint": ds.info.fingerprint,
        "counts": {"planned": len(rows), "generated": len(rows), "missing": 0, "failed": 0}})
    storage.write_text_atomic(os.path.join(synthetic, "_SUCCESS"), "")


def load_pairs(synthetic: str) -> tuple[list[dict], dict[str, bytes], object]:
    import pyarrow.parquet as pq

    from diffmix_ray import canonical, storage

    rows = pq.read_table(os.path.join(synthetic, "shards")).to_pylist()
    ds = canonical.open_dataset(storage.read_json(os.path.join(synthetic, "manifest.json"))["identity"]["dataset"])
    sources = {r["image_id"]: r["image"] for r in ds.read_split("train").to_pylist()}
    return rows, sources, ds.info


def features(out):
    """get_image_features' result: a tensor in transformers 4, an output whose pooler_output it is in 5."""
    return out if hasattr(out, "shape") else out.pooler_output


class HandWritten:
    """The reference's filter loop, extended to the project's scores, as a user would write it."""

    def __init__(self, clip: str, info, device: str | None = None):
        try:  # transformers 5's PIL backend: the slow processor of transformers 4
            from transformers.models.clip import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor

        from diffmix_ray.contracts import object_prompts
        from diffmix_ray.models.clip import load_clip
        from diffmix_ray.score.scorer import class_prompts

        self.model, self.tokenizer, ref = load_clip(clip, device=device)
        p = ref.prep
        self.processor = Processor(size={"shortest_edge": p.shortest_edge}, resample=p.resample,
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
            a, b = (features(m.get_image_features(pixel_values=x)) for x in (pixels, src_pixels))
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


class TreeCPU:
    """CPU seconds used by a process and all its descendants (the CLI, the Ray it starts, every
    worker), sampled every `period` s; a process that exits keeps its last reading."""

    def __init__(self, pid: int, period: float = 0.5):
        import threading

        import psutil

        self.root, self.period, self.samples = psutil.Process(pid), period, []
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                return
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.last[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.samples.append((time.time(), sum(self.last.values())))
            self._stop.wait(self.period)

    def at(self, when: float) -> float:
        """CPU seconds used up to `when` (the nearest sample)."""
        return min(self.samples, key=lambda s: abs(s[0] - when))[1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
