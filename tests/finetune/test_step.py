"""The fine-tuning step with the class tokens as their own parameter, in-process (no Ray): the class tokens in their own small
parameter train exactly as the old full-matrix path did (tests/finetune/reference.py), checkpoints
written by the old code resume, no step waits for the device between reports, and gradient
checkpointing and torch.compile leave the step's result as it was."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffmix_ray.finetune import run as ft_run
from diffmix_ray.finetune.config import FinetuneConfig
from diffmix_ray.finetune.data import local_batches
from diffmix_ray.finetune.loop import CKPT_OPTIMIZER, CKPT_WEIGHTS, Finetuner, Progress, train

from tests.finetune.reference import FullMatrixFinetuner
from tests.host_syncs import HostCopies, HostSyncs
from tests.paths import DATA

# Written by the older checkpoint format's code (commit 689756f): 3 steps of `_cfg()` below on the sample dataset.
OLD_CHECKPOINT = str(DATA / "finetune_checkpoint_v1")
CLOSE = dict(rtol=1e-5, atol=1e-7)


def _cfg(dataset: str, **kw) -> FinetuneConfig:
    base = dict(dataset=dataset, out="unused", model="tiny", max_steps=3, batch_size=2, checkpoint_every=1000,
                log_every=2, lr=1e-2, ti_lr=5e-2, seed=0, rank=2)
    return FinetuneConfig(**(base | kw))


@pytest.fixture(scope="module")
def setup(sample_dataset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fast on a shared 2-core machine
    inputs = ft_run.resolve_inputs(_cfg(sample_dataset))
    batches = [b for _, b in zip(range(6), next(local_batches(inputs.dataset, 64, 2, False, seed=0)))]
    yield inputs, batches
    torch.set_num_threads(threads)


def _tuner(inputs, **kw) -> Finetuner:
    return Finetuner(_cfg(inputs.cfg.dataset, **kw), inputs.prompts, inputs.tokens, inputs.init_ids,
                     torch.device("cpu"))


def _reference(inputs, **kw) -> FullMatrixFinetuner:
    return FullMatrixFinetuner(_tuner(inputs, **kw), inputs.init_ids)


def _assert_same_weights(new: Finetuner, old: FullMatrixFinetuner) -> None:
    a, b = new.trainable_tensors(), old.trainable_tensors()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **CLOSE, msg=lambda m: f"{name}: {m}")


def _step_both(new: Finetuner, old: FullMatrixFinetuner, batches: list[dict], first_step: int) -> None:
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # the same latents, noise and timesteps for both
        new_loss = float(new.train_step(batch, first_step + i))
        torch.manual_seed(100 + i)
        old_loss = old.train_step(batch, first_step + i)
        assert new_loss == pytest.approx(old_loss, rel=1e-5)
        _assert_same_weights(new, old)


@pytest.mark.parametrize("mode", ["ti+lora", "ti"])
def test_tokens_and_lora_train_as_the_full_matrix_path_did(setup, mode):
    inputs, batches = setup
    new, old = _tuner(inputs, mode=mode, warmup_steps=2), _reference(inputs, mode=mode, warmup_steps=2)
    _assert_same_weights(new, old)
    start = {k: v.clone() for k, v in new.trainable_tensors().items()}  # (views of the live weights on CPU)
    _step_both(new, old, batches, first_step=1)
    moved = {k: float((v - start[k]).abs().max()) for k, v in new.trainable_tensors().items()}
    seen = {f"embed.{inputs.tokens[int(label)]}" for batch in batches for label in batch["label"]}
    assert min(moved.values()) > 0 and seen  # weight decay moves even the tokens of classes not in the batches
    assert all(v > 1e-3 for k, v in moved.items() if k in seen or k.startswith("lora.")), moved  # a real test
    vocab = new.class_tokens.first_id
    assert torch.equal(old.embeddings.weight[:vocab], new.class_tokens.base.weight)  # both left the vocabulary be
    assert len(new.optimizer.state[new.class_tokens.vectors]["exp_avg"]) == len(inputs.tokens)  # C rows, not 564


def test_checkpoint_written_by_the_old_code_resumes(setup):
    """The fixture holds today's layout ("embed.<token>" tensors, Adam moments cut to the class rows):
    the new code restores it exactly and continues as the old code continues from it."""
    inputs, batches = setup
    new, old = _tuner(inputs), _reference(inputs)
    progress = new.load(OLD_CHECKPOINT, rank=0)
    assert old.load(OLD_CHECKPOINT) == 3
    with open(os.path.join(OLD_CHECKPOINT, "progress-rank0.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert progress.step == 3 and progress.resumed_at == [3] and progress.data_digest == saved["data_digest"]
    assert new.param_digest() == saved["param_digest"]  # the weights as the old code saved them, bit for bit
    stored = torch.load(os.path.join(OLD_CHECKPOINT, CKPT_OPTIMIZER), weights_only=True)["optimizer"]["state"][0]
    state = new.optimizer.state[new.class_tokens.vectors]
    assert torch.equal(state["exp_avg"], stored["exp_avg"]) and torch.equal(state["exp_avg_sq"], stored["exp_avg_sq"])
    _assert_same_weights(new, old)
    _step_both(new, old, batches[:2], first_step=4)


def test_checkpoints_keep_the_old_layout(setup, tmp_path):
    """A checkpoint written now holds what the old code wrote (same names, shapes, optimizer state
    layout), so the old code could read it back too."""
    inputs, batches = setup
    new = _tuner(inputs)
    progress = train(new, iter([batches[:3]]), Progress(), lambda m, c: None)
    new.save(str(tmp_path), progress, rank=0)
    old_tensors, new_tensors = load_file(os.path.join(OLD_CHECKPOINT, CKPT_WEIGHTS)), load_file(tmp_path / CKPT_WEIGHTS)
    assert {k: v.shape for k, v in new_tensors.items()} == {k: v.shape for k, v in old_tensors.items()}
    old_opt = torch.load(os.path.join(OLD_CHECKPOINT, CKPT_OPTIMIZER), weights_only=True)
    new_opt = torch.load(tmp_path / CKPT_OPTIMIZER, weights_only=True)
    shapes = [{i: {k: v.shape for k, v in s["optimizer"]["state"][i].items()} for i in s["optimizer"]["state"]}
              for s in (old_opt, new_opt)]
    assert shapes[0] == shapes[1] and new_opt["step"] == 3
    group_keys = [[g.keys() for g in s["optimizer"]["param_groups"]] for s in (old_opt, new_opt)]
    assert group_keys[0] == group_keys[1]
    old = _reference(inputs)
    assert old.load(str(tmp_path)) == 3
    _assert_same_weights(new, old)


def test_no_host_sync_between_reports(setup):
    inputs, batches = setup
    tuner = _tuner(inputs, max_steps=6, log_every=3)
    syncs = HostSyncs(lambda: {id(state["step"]) for state in tuner.optimizer.state.values()})
    reports = []

    def before_step(step: int) -> None:
        syncs.step = step

    with HostCopies(syncs), syncs:
        progress = train(tuner, iter([batches]), Progress(), lambda m, c: reports.append(m), before_step=before_step)
    assert [m["step"] for m in reports] == [3, 6] and progress.step == 6
    steps_with_syncs = sorted({step for step, _ in syncs.events})
    assert steps_with_syncs == [3, 6], syncs.events  # only where a report reads the loss and hashes the keys
    old = _reference(inputs)  # the recorder does see the old step's syncs: float(loss), the row masks
    old_syncs = HostSyncs(lambda: {id(state["step"]) for state in old.optimizer.state.values()})
    with HostCopies(old_syncs), old_syncs:
        old.train_step(batches[0], 1)
    assert {"aten._local_scalar_dense", "aten.index", "aten.index_put_"} <= {name for _, name in old_syncs.events}
    digest = ""  # the old code's record: one running sha256 per step, hashed as the step ended
    for batch in batches:
        digest = hashlib.sha256(digest.encode() + batch["key"].numpy().tobytes()).hexdigest()
    assert progress.data_digest == digest


def test_gradient_checkpointing_gives_the_same_steps(setup):
    inputs, batches = setup
    plain, checkpointed = _tuner(inputs), _tuner(inputs, gradient_checkpointing=True)
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    for step, batch in enumerate(batches[:2], 1):
        for tuner in (plain, checkpointed):
            torch.manual_seed(step)
            tuner.train_step(batch, step)
    a, b = plain.trainable_tensors(), checkpointed.trainable_tensors()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **CLOSE)


def test_compile_keeps_parameter_names_and_the_step(setup, monkeypatch):
    """--compile compiles the UNet in place: checkpoints and the LoRA export see the same names.
    The step runs through torch.compile (dynamo) with the 'eager' backend here: inductor's C++ build
    of even the tiny UNet took ~2 minutes on the 2-core CPU; the benchmark measures the real thing."""
    inputs, batches = setup
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="eager"))
    plain, compiled = _tuner(inputs), _tuner(inputs, compile=True)
    assert compiled.unet._compiled_call_impl is not None and plain.unet._compiled_call_impl is None
    assert compiled.trainable_tensors().keys() == plain.trainable_tensors().keys()
    for tuner in (plain, compiled):
        torch.manual_seed(1)
        tuner.train_step(batches[0], 1)
    a, b = plain.trainable_tensors(), compiled.trainable_tensors()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **CLOSE)


def test_cli_and_yaml_pass_the_speed_options(sample_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    seen = []
    monkeypatch.setattr(ft_run, "run_finetune", lambda cfg, **kw: seen.append(cfg))
    args = ["finetune", "--dataset", sample_dataset, "--out", str(tmp_path / "o")]
    assert CliRunner().invoke(app, args + ["--gradient-checkpointing", "--compile"]).exit_code == 0
    config = tmp_path / "ft.yaml"
    config.write_text("gradient_checkpointing: true\ncompile: true\n")
    assert CliRunner().invoke(app, args + ["--config", str(config), "--no-compile"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 0
    assert [(c.gradient_checkpointing, c.compile) for c in seen] == [(True, True), (True, False), (False, False)]
    assert seen[0].identity() == seen[2].identity()  # execution options: a resume may switch them


def test_bf16_autocast_step_on_cpu(setup):
    """The GPU's reduced-precision path on the CPU (bf16 frozen weights under bf16 autocast, fp32
    trainables), so a dtype mismatch in it fails here and not first on a rented GPU."""
    inputs, batches = setup
    tuner = _tuner(inputs, precision="bf16")
    assert tuner.unet.dtype == torch.bfloat16 and tuner.class_tokens.vectors.dtype == torch.float32
    vocab = tuner.class_tokens.base.weight.clone()
    start = {k: v.clone() for k, v in tuner.trainable_tensors().items()}
    losses = [float(tuner.train_step(batch, step)) for step, batch in enumerate(batches[:3], start=1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = {k: float((v - start[k]).abs().max()) for k, v in tuner.trainable_tensors().items()}
    assert min(moved.values()) > 0  # tokens and LoRA both train
    assert torch.equal(vocab, tuner.class_tokens.base.weight)  # the vocabulary stays frozen


def test_per_class_schedule_moves_only_the_batchs_class_token_and_resumes(setup, tmp_path):
    """token_schedule per-class (DA-Fusion's separate runs): each step's batch is one class, and every
    other class's token leaves the step bit for bit as it entered it, weight decay included; the
    optimizer's per-row state survives a checkpoint, so a resumed run takes the same next step."""
    inputs, _ = setup
    kw = dict(mode="ti", token_schedule="per-class", max_steps=4)
    tuner = _tuner(inputs, **kw)
    batches = [b for _, b in zip(range(4), next(local_batches(inputs.dataset, 64, 2, False, seed=0, per_class=True)))]
    seen = []
    for step, batch in enumerate(batches[:3], 1):
        (c,) = set(batch["label"].tolist())  # one class per step
        before = tuner.class_tokens.vectors.detach().clone()
        tuner.train_step(batch, step)
        after = tuner.class_tokens.vectors.detach()
        others = [k for k in range(len(inputs.tokens)) if k != c]
        assert torch.equal(after[others], before[others]) and not torch.equal(after[c], before[c]), step
        seen.append(c)
    assert len(set(seen)) == 3  # a round visits different classes
    counts = tuner.optimizer.state[tuner.class_tokens.vectors]["step"]
    assert counts.tolist() == [float(seen.count(k)) for k in range(len(inputs.tokens))]
    progress = Progress(step=3)
    tuner.save(str(tmp_path), progress, rank=0)
    resumed = _tuner(inputs, **kw)
    resumed.load(str(tmp_path), rank=0)
    for t in (tuner, resumed):
        torch.manual_seed(7)
        t.train_step(batches[3], 4)
    torch.testing.assert_close(resumed.class_tokens.vectors, tuner.class_tokens.vectors, rtol=0, atol=0)
