"""The score benchmark's own pieces: its inputs (a generate output in the shard contract over CUB-like
JPEGs) and the hand-written CLIP loop that the CPU and GPU measurements compare against."""

from __future__ import annotations

import io
import os

import numpy as np

from _inputs import SOURCE_SIZE as SIZE  # generate writes translations back at the source's size
from _inputs import cub_like_dataset, jpeg

CLASSES = 4


# ---------------------------------------------------------------------------------------------
# Inputs: a canonical dataset and a generate output in the shard contract (no diffusion: each
# "translation" is its source with the colour channels rolled, re-encoded)
# ---------------------------------------------------------------------------------------------
def make_inputs(work: str, train_images: int, per_image: int, shard_rows: int) -> str:
    """A dataset of `train_images` 500x375 JPEGs and two generate outputs over it: `synthetic`
    (per_image pairs per source) and `synthetic-quarter` (its first quarter, whole shards)."""
    from PIL import Image

    from diffmix_ray import canonical

    ds = canonical.open_dataset(cub_like_dataset(work, train_images))
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
