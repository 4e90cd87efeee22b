"""Builders for small raw datasets in every supported layout, made by the tests themselves."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


# The classifier fit the train-cls tests share (conftest.py `shapes_fit`) and vary from.
SHAPES_FIT = dict(arch="test_resnet", img_size=32, epochs=5, batch_size=8, lr=0.01, optimizer="adamw", weight_decay=0.0,
                  warmup_epochs=0.0, cpus_per_worker=1.0, seed=0)


def image_bytes(color=(200, 30, 30), size=(24, 20), fmt="JPEG", mode="RGB") -> bytes:
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def colour(i: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(i)
    return tuple(int(v) for v in rng.integers(0, 255, 3))


def make_imagefolder(root: str, classes: dict[str, int], splits: dict[str, float] | None = None) -> str:
    """root/<class>/<i>.jpg (or root/<split>/<class>/... when `splits` maps split -> share)."""
    k = 0
    for name, n in classes.items():
        for i in range(n):
            k += 1
            if splits:
                split = list(splits)[i % len(splits)]
                path = os.path.join(root, split, name, f"{i:03d}.jpg")
            else:
                path = os.path.join(root, name, f"{i:03d}.jpg")
            write(path, image_bytes(colour(k)))
    return root


def make_cub(root: str, num_classes: int = 3, per_class: int = 4) -> str:
    images, labels, split, classes = [], [], [], []
    n = 0
    for c in range(1, num_classes + 1):
        folder = f"{c:03d}.Bird_Number_{c}"
        classes.append(f"{c} {folder}")
        for i in range(per_class):
            n += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            write(os.path.join(root, "images", rel), image_bytes(colour(n)))
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
            split.append(f"{n} {1 if i % 2 == 0 else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", classes)):
        write(os.path.join(root, name), ("\n".join(lines) + "\n").encode())
    return root


def make_flowers102(root: str, per_class: int | list[int] = 3, interleave: bool = False) -> str:
    """Flowers-102 layout. `per_class` may list each class's image count; `interleave` numbers the
    images round-robin over classes (as in the real data, where a class's images are not contiguous)."""
    import scipy.io

    n_classes = 102
    sizes = [per_class] * n_classes if isinstance(per_class, int) else list(per_class)
    labels = np.repeat(np.arange(1, n_classes + 1), sizes)
    if interleave:
        rank = np.concatenate([np.arange(n) for n in sizes])  # position within its class
        labels = labels[np.lexsort((labels, rank))]
    for i in range(len(labels)):
        write(os.path.join(root, "jpg", f"image_{i + 1:05d}.jpg"), image_bytes(colour(i), size=(8, 8)))
    ids = np.arange(1, len(labels) + 1)
    scipy.io.savemat(os.path.join(root, "imagelabels.mat"), {"labels": labels[None, :]})
    scipy.io.savemat(os.path.join(root, "setid.mat"), {"trnid": ids[0::3][None, :], "valid": ids[1::3][None, :],
                                                       "tstid": ids[2::3][None, :]})
    return root


def make_parquet(path: str, labels: list[int], hf_struct: bool = False, names: list[str] | None = None,
                 ids: list[str] | None = None, splits: list[str] | None = None) -> str:
    imgs = [image_bytes(colour(i)) for i in range(len(labels))]
    cols = {"img": [{"bytes": b, "path": None} for b in imgs] if hf_struct else imgs, "target": labels}
    if ids is not None:
        cols["uid"] = ids
    if splits is not None:
        cols["part"] = splits
    table = pa.table(cols)
    if names is not None:  # what Hugging Face `datasets` stores for a ClassLabel feature
        meta = {"info": {"features": {"target": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


def make_random_bank(out: str, model: str, dataset_uri: str, mode: str = "ti+lora", seed: int = 0) -> str:
    """A concept bank with random (seeded, non-zero) LoRA weights and token embeddings for the
    dataset at `dataset_uri`, in the format `finetune` writes."""
    from diffmix_ray import canonical
    from diffmix_ray.models.concepts import write_random_bank

    info = canonical.open_dataset(dataset_uri).info
    return write_random_bank(out, model, info.classes, info.super_class, info.fingerprint, mode=mode, seed=seed,
                             token_std=1.0)


def fake_synthetic(out: str, dataset_uri: str, strength: float, relabel: int = 0, seed: int = 0,
                   complete: bool = True, missing: int = 0) -> str:
    """A generate output in the exact shard format whose images are the source images themselves
    (a perfect low-strength translation): isolates train-cls's label bookkeeping from the model.
    `relabel`: every shard claims its image is of class (label + relabel) mod C, a consistent lie."""
    import pyarrow as pa

    from diffmix_ray import canonical, storage
    from diffmix_ray.contracts import SHARD_SCHEMA

    ds = canonical.open_dataset(dataset_uri)
    train = ds.read_split("train")
    n, C = train.num_rows, ds.info.num_classes
    labels = np.asarray(train.column("label").to_pylist())
    source = (labels + relabel) % C
    target = (source + 1) % C  # inter-class: the soft label keeps most weight on the source
    sizes = [Image.open(io.BytesIO(b)).size for b in train.column("image").to_pylist()]
    table = pa.table({
        "pair_id": [f"s{seed}-{i:08d}" for i in range(n)], "source_id": train.column("image_id"),
        "source_label": pa.array(source, pa.int32()), "target_label": pa.array(target, pa.int32()),
        "strength": pa.array([strength] * n, pa.float32()), "seed": pa.array(range(n), pa.int64()),
        "mode": ["real-mix"] * n, "image": train.column("image"),
        "width": pa.array([w for w, _ in sizes], pa.int32()), "height": pa.array([h for _, h in sizes], pa.int32()),
        "prompt": [f"a photo of a {ds.info.classes[t]}" for t in target]}, schema=SHARD_SCHEMA)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    pq.write_table(table, os.path.join(out, "shards", "shard-fake-00000.parquet"))
    manifest = {"dataset_fingerprint": ds.info.fingerprint, "config": {"mode": "real-mix"},
                "identity": {"dataset": ds.uri, "model_fingerprint": "fake"},
                "counts": {"planned": n + missing, "generated": n, "missing": missing, "failed": 0}}
    storage.write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    if complete:
        storage.write_text_atomic(os.path.join(out, "_SUCCESS"), "")
    return out


def fake_scores(synthetic: str, values: dict[str, list] | None = None, name: str = "default", complete: bool = True,
                fingerprint: str | None = None, drop: int = 0) -> str:
    """A `score` output for a generate output in the exact scores format, with the given column values
    (one per pair, in shard order; columns not given are null, CLIP columns 0.5). `fingerprint`: the
    shards it claims to score (default: these shards'); `drop`: leave the last N pairs unscored."""
    import pyarrow as pa

    from diffmix_ray import storage
    from diffmix_ray.contracts import SCORE_COLUMNS, SCORES_SCHEMA

    manifest = storage.read_json(os.path.join(synthetic, "manifest.json"))
    shards = sorted(os.listdir(os.path.join(synthetic, "shards")))
    rows = pa.concat_tables([pq.read_table(os.path.join(synthetic, "shards", s),
                                           columns=["pair_id", "source_label", "target_label"]) for s in shards])
    n = rows.num_rows - drop
    cols = {"pair_id": rows.column("pair_id").slice(0, n), "source_label": rows.column("source_label").slice(0, n),
            "target_label": rows.column("target_label").slice(0, n)}
    for c in SCORE_COLUMNS:
        given = (values or {}).get(c)
        default = [0.5] * n if c.startswith("clip_") else [None] * n
        cols[c] = pa.array(list(given)[:n] if given is not None else default, pa.float32())
    out = os.path.join(synthetic, "scores", name)
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table(cols, schema=SCORES_SCHEMA), os.path.join(out, "scores-fake-000000-0.parquet"))
    identity = {"scores_version": 1, "synthetic_fingerprint": fingerprint or storage.config_hash(manifest["identity"]),
                "clip_fingerprint": f"fake-{name}"}
    storage.write_json_atomic(os.path.join(out, "manifest.json"), {
        "identity": identity, "synthetic": synthetic, "synthetic_fingerprint": identity["synthetic_fingerprint"],
        "clip": {"spec": "tiny", "kind": "preset", "fingerprint": "fake"}, "classifier": None,
        "columns": list(SCORE_COLUMNS), "counts": {"pairs": rows.num_rows, "scored": n, "missing": drop, "failed": 0}})
    if complete:
        storage.write_text_atomic(os.path.join(out, "_SUCCESS"), "")
    return out


def straight_finetune(cfg) -> dict:
    """The trainable tensors (as a checkpoint holds them) after cfg.max_steps of the finetune stage's own
    step loop, run straight through in this process on one worker's CPU threads: what a Ray Train worker
    of `cfg` computes when nothing interrupts it, at the cost of the steps alone."""
    import torch

    from diffmix_ray import canonical
    from diffmix_ray.contracts import COL_LABEL
    from diffmix_ray.finetune import run as ft_run
    from diffmix_ray.finetune.data import read_train, step_epochs
    from diffmix_ray.finetune.loop import Finetuner, Progress, _noise_seed, train
    from diffmix_ray.finetune.sampling import sampler_for

    inputs = ft_run.resolve_inputs(cfg)
    cfg = inputs.cfg
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # as train_func sets it on a CPU worker
    try:
        tuner = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
        torch.manual_seed(_noise_seed(cfg.seed, 0, 0))
        table = read_train(canonical.open_dataset(inputs.dataset.uri))
        sampler = sampler_for(table.column(COL_LABEL).to_numpy(), inputs.dataset.info.num_classes,
                              cfg.token_schedule, cfg.class_balanced, cfg.seed, cfg.batch_size, 1)
        epochs = step_epochs(table, sampler, inputs.model.resolution, 0, first_step=1)
        train(tuner, epochs, Progress(), lambda metrics, checkpoint: None, world_size=1, rank=0)
        return tuner.trainable_tensors()
    finally:
        torch.set_num_threads(threads)
