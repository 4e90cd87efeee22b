"""The classifier-run contract (contracts.CLASSIFIER_*), read and written here only: `train-cls`
writes it (classify/loop.py the selected weights, classify/run.py the metrics); `evaluate`, `score
--classifier` and `report` read it. Weights travel as bytes: this module needs no torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from . import storage
from .contracts import (CLASSIFIER_BEST_DIR, CLASSIFIER_METRICS_JSON, CLASSIFIER_MODEL_JSON, CLASSIFIER_SEEDS_JSON,
                        CLASSIFIER_WEIGHTS, SUCCESS)
from .errors import DiffmixError


@dataclass(frozen=True)
class Best:
    """A run's selected weights as stored in its best/ folder."""

    uri: str  # the best/ folder
    card_text: str  # model.json, as stored
    card: dict  # ... parsed
    weights: bytes  # model.pt: a serialised state_dict

    @property
    def fingerprint(self) -> str:
        """sha256 over the model card and the weights: same fingerprint, same classifier."""
        h = hashlib.sha256(self.card_text.encode("utf-8"))
        h.update(hashlib.sha256(self.weights).digest())
        return h.hexdigest()


def best_dir(run: str) -> str:
    return storage.join(storage.normalize(run), CLASSIFIER_BEST_DIR)


def write_best(out: str, weights: bytes, card: dict) -> None:
    """The selected weights (a serialised state_dict) and their model card (model.json), the card
    last: a reader that finds model.json finds the weights it describes."""
    best = best_dir(out)
    storage.write_bytes_atomic(storage.join(best, CLASSIFIER_WEIGHTS), weights)
    storage.write_text_atomic(storage.join(best, CLASSIFIER_MODEL_JSON), json.dumps(card, indent=2))


def find_best(run: str) -> str | None:
    """The best/ folder of `run`, or `run` itself when it is one; None when neither holds a model card."""
    run = storage.normalize(run)
    for base in (storage.join(run, CLASSIFIER_BEST_DIR), run):
        if storage.exists(storage.join(base, CLASSIFIER_MODEL_JSON)):
            return base
    return None


def read_best(best: str) -> Best:
    """The model card and the weights of a best/ folder (`find_best` or `best_dir`)."""
    card_uri = model_card_uri(best)
    text = storage.read_text(card_uri)
    try:
        card = json.loads(text)
    except json.JSONDecodeError as e:
        raise DiffmixError(f"{card_uri} is not valid JSON ({e})") from e
    return Best(best, text, card, storage.read_bytes(weights_uri(best)))


def weights_uri(best: str) -> str:
    return storage.join(best, CLASSIFIER_WEIGHTS)


def model_card_uri(best: str) -> str:
    return storage.join(best, CLASSIFIER_MODEL_JSON)


def is_finished(run: str) -> bool:
    return storage.exists(storage.join(storage.normalize(run), SUCCESS))


def mark_finished(out: str) -> None:
    """The run is finished: its metrics and best weights are final (written after them)."""
    storage.write_text_atomic(storage.join(out, SUCCESS), "")


def write_metrics(out: str, metrics: dict) -> None:
    storage.write_json_atomic(storage.join(out, CLASSIFIER_METRICS_JSON), metrics)


def has_metrics(run: str) -> bool:
    return storage.exists(storage.join(run, CLASSIFIER_METRICS_JSON))


def read_metrics(run: str) -> dict:
    return storage.read_json(storage.join(run, CLASSIFIER_METRICS_JSON))


def write_seeds_summary(out: str, summary: dict) -> None:
    storage.write_json_atomic(storage.join(out, CLASSIFIER_SEEDS_JSON), summary)
