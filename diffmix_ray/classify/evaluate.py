"""`diffmix-ray evaluate`: re-score a classifier run's selected weights (best/) on a dataset split,
through the same image pipeline the run evaluated with (its data config is stored with the weights)."""

from __future__ import annotations

import json

import numpy as np
import torch

from .. import canonical, storage
from ..contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
from ..errors import DiffmixError
from ..models.safe_load import load_plain
from .data import decode
from .loop import BEST_DIR
from .model import build_model
from .transforms import ToInput, pipeline


def load_best(run: str):
    """(model, meta) of <run>/best/; `run` may also point at the best/ folder itself."""
    run = storage.normalize(run)
    for base in (storage.join(run, BEST_DIR), run):
        if storage.exists(storage.join(base, "model.json")):
            meta = json.loads(storage.read_text(storage.join(base, "model.json")))
            model = build_model(meta["arch"], meta["num_classes"])
            weights = storage.join(base, "model.pt")
            state = load_plain(storage.read_bytes(weights), weights)
            model.load_state_dict(state)
            return model.eval(), meta
    raise DiffmixError(f"{run} holds no {BEST_DIR}/model.json: pass a `train-cls` output directory")


def evaluate(checkpoint: str, dataset_uri: str, split: str = "test", batch_size: int = 64) -> dict:
    model, meta = load_best(checkpoint)
    dataset = canonical.open_dataset(dataset_uri)
    info = dataset.info
    if info.num_classes != meta["num_classes"]:
        raise DiffmixError(f"the model predicts {meta['num_classes']} classes but {dataset_uri} has {info.num_classes}")
    if not info.has_split(split):
        raise DiffmixError(f"{dataset_uri} has no {split!r} split to evaluate on; it has "
                           f"{', '.join(info.splits) or 'none'}")
    table = dataset.read_split(split, columns=[COL_IMAGE_ID, COL_IMAGE, COL_LABEL])
    tf, to_input = pipeline(meta["data_cfg"], training=False), ToInput(meta["data_cfg"], "cpu")
    ids, images = table.column(COL_IMAGE_ID).to_pylist(), table.column(COL_IMAGE).to_pylist()
    labels = np.asarray(table.column(COL_LABEL).to_pylist())
    preds = []
    with torch.no_grad():  # the run's evaluation path: uint8 pixels, then normalised as on its device
        for i in range(0, len(images), batch_size):
            pixels = np.stack([tf(decode(b, f"image_id {ids[j]!r} of {dataset_uri}, split {split}"))
                               for j, b in enumerate(images[i:i + batch_size], start=i)])
            preds.append(model(to_input(torch.from_numpy(pixels))).argmax(1).numpy())
    pred = np.concatenate(preds)
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
                 for c in range(info.num_classes)]
    return {"split": split, "images": int(len(labels)), "top1": float((pred == labels).mean()),
            "per_class": per_class, "selected_epoch": meta["epoch"], "select": meta.get("select", "val"),
            "same_dataset_as_training": meta["dataset_fingerprint"] == info.fingerprint}
