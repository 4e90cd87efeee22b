"""Checkpoints that load without running code, and a fine-tune resume that is bit-exact.

- Every torch.load in the package passes weights_only=True (a pickle planted in a shared --out, an
  S3 prefix say, must never run); a planted payload is refused with the file named.
- A fine-tune killed after a checkpoint and resumed ends bit-identical to an uninterrupted run on
  CPU: each step's latents, noise and timesteps come from (seed, rank, step), never from the global
  RNG a process happens to be in."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from diffmix_ray.errors import DiffmixError

PACKAGE = Path(__file__).resolve().parents[1] / "diffmix_ray"


def test_every_torch_load_is_weights_only():
    unsafe = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


class Payload:
    """Unpickling this runs code: what an attacker plants in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: str, marker: str) -> str:
    torch.save({"model": {}, "history": [], "epoch": 0, "step": 0, "evil": Payload(marker)}, path)
    return path


def test_a_planted_pickle_in_a_classifier_checkpoint_is_refused(tmp_path):
    from diffmix_ray.classify.loop import load_state

    marker = str(tmp_path / "pwned")
    state = _plant(str(tmp_path / "state.pt"), marker)
    with pytest.raises(DiffmixError, match=rf"{state} .*not a plain checkpoint.*refus"):
        load_state(state)
    assert not os.path.exists(marker)


def test_a_planted_pickle_in_best_weights_is_refused(tmp_path):
    import json

    from diffmix_ray.classify.evaluate import load_best

    marker = str(tmp_path / "pwned")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.json").write_text(json.dumps({"arch": "test_resnet", "num_classes": 2}))
    _plant(str(tmp_path / "best" / "model.pt"), marker)
    with pytest.raises(DiffmixError, match=r"model\.pt .*not a plain checkpoint"):
        load_best(str(tmp_path))
    assert not os.path.exists(marker)


def test_the_classifier_checkpoint_state_loads_weights_only(tmp_path):
    """What the loop saves (model, optimizer with momentum/Adam moments, history, the selection) is
    plain data: it round-trips through a weights_only load."""
    from diffmix_ray.classify.loop import CKPT_FILE, checkpoint_state, load_state
    from diffmix_ray.classify.model import build_model
    from diffmix_ray.classify.selected import Selected

    model = build_model("test_resnet", 3)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.AdamW(model.parameters())):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        history = [{"epoch": 0, "train_loss": 1.5, "val": {"top1": 0.5, "per_class": [None, 1.0, 0.0]},
                    "lr": 0.1, "seconds": 1.0, "steps": 3}]
        selected = Selected(0, {k: v.clone() for k, v in model.state_dict().items()})
        state = checkpoint_state(model, opt, 1, 6, selected) | {"history": history}
        torch.save(state, tmp_path / CKPT_FILE)
        loaded = load_state(str(tmp_path / CKPT_FILE))
        assert loaded["history"] == history and loaded["epoch"] == 1 and loaded["step"] == 6
        assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
        opt.load_state_dict(loaded["optimizer"])


# ---------------------------------------------------------------------------------------------
# A fine-tune resume is bit-exact
# ---------------------------------------------------------------------------------------------
def test_a_resumed_finetune_is_bit_identical_to_an_uninterrupted_one(sample_dataset, tmp_path):
    from diffmix_ray import canonical
    from diffmix_ray.contracts import COL_LABEL
    from diffmix_ray.finetune import run as ft_run
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.finetune.data import read_train, step_epochs
    from diffmix_ray.finetune.loop import Finetuner, Progress, train
    from diffmix_ray.finetune.sampling import StepSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = FinetuneConfig(dataset=sample_dataset, out="unused", model="tiny", max_steps=6, batch_size=2,
                         checkpoint_every=3, log_every=3, lr=1e-2, ti_lr=5e-2, seed=0, rank=2)
    inputs = ft_run.resolve_inputs(cfg)
    table = read_train(canonical.open_dataset(sample_dataset))
    sampler = StepSampler(table.column(COL_LABEL).to_numpy(), inputs.dataset.info.num_classes, False, cfg.seed,
                          cfg.batch_size)

    def tuner():
        return Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))

    def epochs(first):
        return step_epochs(table, sampler, 64, rank=0, first_step=first, prefetch=0)

    class Killed(Exception):
        pass

    try:
        torch.manual_seed(1)  # whatever the process's global RNG holds, the steps must not depend on it
        straight = tuner()
        train(straight, epochs(1), Progress(), lambda m, c: None)

        torch.manual_seed(2)
        first = tuner()

        def save_then_die(metrics, checkpoint):
            first.save(str(tmp_path), first_progress, 0)
            raise Killed

        first_progress = Progress()
        with pytest.raises(Killed):
            train(first, epochs(1), first_progress, save_then_die)

        torch.manual_seed(3)  # a new process: another global RNG state
        resumed = tuner()
        progress = resumed.load(str(tmp_path), 0)
        assert progress.step == 3
        train(resumed, epochs(progress.step + 1), progress, lambda m, c: None)
    finally:
        torch.set_num_threads(threads)
    a, b = straight.trainable_tensors(), resumed.trainable_tensors()
    assert a.keys() == b.keys()
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    worst = sorted(differ.items(), key=lambda kv: -kv[1])[:3]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ; largest |delta|: {worst}"
