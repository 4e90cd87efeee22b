"""The epoch a classifier run reports and its weights, kept as the run goes so that test is scored
once, at the end, on exactly those weights (`--select val`: the best val top-1 so far, earliest on
ties; `--select last`: the final epoch). Plain torch, no Ray.

Checkpoints carry the selected epoch and, when it is not the checkpoint's own epoch, its weights, so
a resumed run still knows them. Checkpoints of older versions (before the selection was recorded) hold neither; their history has
test scored at every epoch (the code then did), and best/ on disk already holds the selected weights,
so nothing is lost: the selected epoch is recomputed from the history and its weights stay unknown
unless it is the checkpoint's own epoch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEY_EPOCH = "selected_epoch"
KEY_WEIGHTS = "selected_weights"


def cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def selects(history: list[dict], select: str, epochs: int) -> bool:
    """Whether the epoch just recorded is the one the run reports, as far as it knows: the best val
    top-1 so far (earliest on ties), or, with --select last, the final epoch."""
    if select == "last":
        return history[-1]["epoch"] == epochs - 1
    best_before = max((h["val"]["top1"] for h in history[:-1]), default=-1.0)
    return history[-1]["val"]["top1"] > best_before


@dataclass
class Selected:
    epoch: int | None = None
    weights: dict | None = None  # a CPU copy of the state dict at `epoch`; None: not known

    def update(self, history: list[dict], select: str, epochs: int, model: torch.nn.Module) -> bool:
        """After each epoch's record: take the model's weights when this epoch is selected (one copy to
        the host, at most once per epoch)."""
        if not selects(history, select, epochs):
            return False
        self.epoch, self.weights = history[-1]["epoch"], cpu_copy(model.state_dict())
        return True

    def checkpoint_fields(self, checkpoint_epoch: int) -> dict:
        """What a checkpoint of `checkpoint_epoch` carries: the weights only when they differ from the
        checkpoint's own model."""
        same = self.epoch == checkpoint_epoch
        return {KEY_EPOCH: self.epoch, KEY_WEIGHTS: None if same else self.weights}

    @classmethod
    def restore(cls, saved: dict, select: str, epochs: int) -> "Selected":
        """From a loaded checkpoint (`model`, `epoch`, `history`, and the fields above when written
        by a version that records the selection)."""
        if KEY_EPOCH in saved:
            epoch = saved[KEY_EPOCH]
            weights = saved[KEY_WEIGHTS]
        else:  # an older checkpoint without the selection: replay the selection over the history
            epoch = None
            for i in range(len(saved["history"])):
                if selects(saved["history"][:i + 1], select, epochs):
                    epoch = saved["history"][i]["epoch"]
            weights = None
        if epoch is not None and epoch == saved["epoch"] and weights is None:
            weights = cpu_copy(saved["model"])
        return cls(epoch, weights)
