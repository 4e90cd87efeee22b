"""The classifier of `score --classifier RUN`: the val-selected weights of a finished `train-cls`
run, read through the contract's file names (contracts.CLASSIFIER_*), not classify's internals.

`open_classifier` (driver: no torch) checks the run and fingerprints its weights;
`load_classifier` (actor) builds the timm model and loads them."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from .. import storage
from ..contracts import CLASSIFIER_BEST_DIR, CLASSIFIER_MODEL_JSON, CLASSIFIER_WEIGHTS, SUCCESS
from ..errors import DiffmixError
from .cpu_stages import CLASSIFIER_PIPELINES

META_KEYS = ("arch", "num_classes", "data_cfg", "dataset_fingerprint")


@dataclass(frozen=True)
class ClassifierRun:
    uri: str
    meta: dict  # model.json
    fingerprint: str  # sha256 over model.json and the weights: same fingerprint, same classifier

    @property
    def data_cfg(self) -> dict:
        return self.meta["data_cfg"]

    def summary(self) -> dict:
        return {"run": self.uri, "fingerprint": self.fingerprint, "arch": self.meta["arch"],
                "epoch": self.meta.get("epoch"), "val_top1": self.meta.get("val_top1")}


def _fingerprint(meta_text: str, weights: bytes) -> str:
    h = hashlib.sha256(meta_text.encode("utf-8"))
    h.update(hashlib.sha256(weights).digest())
    return h.hexdigest()


def open_classifier(run: str, dataset_fingerprint: str, num_classes: int) -> ClassifierRun:
    """A finished train-cls run trained on the dataset with `dataset_fingerprint`; refused otherwise."""
    run = storage.normalize(run)
    best = storage.join(run, CLASSIFIER_BEST_DIR)
    meta_uri = storage.join(best, CLASSIFIER_MODEL_JSON)
    if not storage.exists(meta_uri):
        raise DiffmixError(f"--classifier {run} holds no {CLASSIFIER_BEST_DIR}/{CLASSIFIER_MODEL_JSON}: pass a "
                           "`diffmix-ray train-cls` output directory (with --seeds, one of its seed-N folders)")
    if not storage.exists(storage.join(run, SUCCESS)):
        raise DiffmixError(f"--classifier {run} is an unfinished train-cls run (no {SUCCESS}): its best weights may "
                           "still change; finish it (train-cls --resume) or pass a finished run")
    meta_text = storage.read_text(meta_uri)
    meta = storage.read_json(meta_uri)
    if missing := [k for k in META_KEYS if k not in meta]:
        raise DiffmixError(f"{meta_uri} lacks {missing}: it was not written by this diffmix-ray's train-cls")
    if meta["dataset_fingerprint"] != dataset_fingerprint:
        raise DiffmixError(f"--classifier {run} was trained on another dataset (fingerprint "
                           f"{meta['dataset_fingerprint'][:12]}) than the synthetic shards were made from "
                           f"({dataset_fingerprint[:12]}): pass a classifier trained on the same dataset")
    if (augment := meta["data_cfg"].get("augment", "timm")) not in CLASSIFIER_PIPELINES:
        raise DiffmixError(f"--classifier {run} evaluates with the {augment!r} pipeline, which score does not know "
                           f"(it knows {', '.join(CLASSIFIER_PIPELINES)}); upgrade diffmix-ray")
    if meta["num_classes"] != num_classes:
        raise DiffmixError(f"--classifier {run} predicts {meta['num_classes']} classes, the dataset has {num_classes}")
    weights = storage.read_bytes(storage.join(best, CLASSIFIER_WEIGHTS))
    return ClassifierRun(run, meta, _fingerprint(meta_text, weights))


def load_classifier(run: str, fingerprint: str):
    """(timm model in eval mode on CPU, model.json) of `run`. Refuses weights that changed since the driver
    checked them (a run retrained in place mid-scoring would mix two classifiers' scores)."""
    import torch

    from ..models.classifier import create_classifier  # in the actor: the driver side imports no torch

    best = storage.join(storage.normalize(run), CLASSIFIER_BEST_DIR)
    meta_text = storage.read_text(storage.join(best, CLASSIFIER_MODEL_JSON))
    weights = storage.read_bytes(storage.join(best, CLASSIFIER_WEIGHTS))
    if _fingerprint(meta_text, weights) != fingerprint:
        raise DiffmixError(f"--classifier {run} changed while scoring (its weights no longer match the fingerprint "
                           "the run started with); rerun score with --overwrite")
    meta = storage.read_json(storage.join(best, CLASSIFIER_MODEL_JSON))
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model = create_classifier(meta["arch"], meta["num_classes"], state)
    return model.eval(), meta
