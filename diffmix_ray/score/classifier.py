"""The classifier of `score --classifier RUN`: the val-selected weights of a finished `train-cls`
run, read through the contract's reader (classifier_run.py), not classify's internals.

`open_classifier` (driver: no torch) checks the run and fingerprints its weights;
`load_classifier` (actor) builds the timm model and loads them."""

from __future__ import annotations

import io
from dataclasses import dataclass

from .. import classifier_run, storage
from ..contracts import CLASSIFIER_BEST_DIR, CLASSIFIER_MODEL_JSON, CLASSIFIER_MODEL_KEYS, SUCCESS
from ..errors import DiffmixError
from .cpu_stages import CLASSIFIER_PIPELINES


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


def open_classifier(run: str, dataset_fingerprint: str, num_classes: int) -> ClassifierRun:
    """A finished train-cls run trained on the dataset with `dataset_fingerprint`; refused otherwise."""
    run = storage.normalize(run)
    best = classifier_run.best_dir(run)
    meta_uri = classifier_run.model_card_uri(best)
    if not storage.exists(meta_uri):
        raise DiffmixError(f"--classifier {run} holds no {CLASSIFIER_BEST_DIR}/{CLASSIFIER_MODEL_JSON}: pass a "
                           "`diffmix-ray train-cls` output directory (with --seeds, one of its seed-N folders)")
    if not classifier_run.is_finished(run):
        raise DiffmixError(f"--classifier {run} is an unfinished train-cls run (no {SUCCESS}): its best weights may "
                           "still change; finish it (train-cls --resume) or pass a finished run")
    stored = classifier_run.read_best(best)
    meta = stored.card
    if missing := [k for k in CLASSIFIER_MODEL_KEYS if k not in meta]:
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
    return ClassifierRun(run, meta, stored.fingerprint)


def load_classifier(run: str, fingerprint: str):
    """(timm model in eval mode on CPU, model.json) of `run`. Refuses weights that changed since the driver
    checked them (a run retrained in place mid-scoring would mix two classifiers' scores)."""
    import torch

    from ..models.classifier import create_classifier  # in the actor: the driver side imports no torch

    stored = classifier_run.read_best(classifier_run.best_dir(run))
    if stored.fingerprint != fingerprint:
        raise DiffmixError(f"--classifier {run} changed while scoring (its weights no longer match the fingerprint "
                           "the run started with); rerun score with --overwrite")
    meta = stored.card
    state = torch.load(io.BytesIO(stored.weights), map_location="cpu", weights_only=True)
    model = create_classifier(meta["arch"], meta["num_classes"], state)
    return model.eval(), meta
