"""The per-worker classifier training function (Ray Train V2). Epoch-granular resume: the data
iterator's position is not checkpointed, the epoch is.

Per-epoch fixed costs are cut to what resume and selection need (docs/train-cls.md, "Fixed costs"):
- one Ray Dataset streams every remaining epoch's batches (data.run_rows), so the pipeline neither
  drains nor restarts at epoch boundaries, and the next epoch's images are prepared while val runs;
  val's images are decoded once per attempt and kept in the object store;
- a full checkpoint every `checkpoint_every` epochs and after the last one (resume restarts from
  the last one written);
- test is scored once, at the end, on the selected weights (selected.py), unless
  `test_every_epoch`; best/ is written once, at the end."""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch

from . import data, mixing, step
from .loop_config import LoopConfig
from .losses import Criterion
from .model import build_model
from .recipe import CMO_PROB, cmo_active
from .selected import Selected, cpu_copy

CKPT_FILE = "state.pt"
LOOP_KEY = "loop"  # Ray Train's train_loop_config is a dict: the LoopConfig travels under this key
KEEP_EVAL_BYTES = 2 * 2**30  # a rank's decoded val (or test) images up to this size stay in the object store


def _rank_rows(rows: data.Rows, rank: int, world: int) -> data.Rows:
    return data.Rows(*[getattr(rows, c)[rank::world] for c in data.COLS])


class _Split:
    """One evaluation split on this rank: its dataset, built (and for val kept) once per attempt."""

    def __init__(self, name: str, cfg: LoopConfig, rank: int, world: int, keep: bool):
        self.name, self.cfg = name, cfg
        self.exists = len(cfg.rows(name)) > 0  # the same on every rank
        self.rows = _rank_rows(cfg.rows(name), rank, world)
        self.keep, self._ds = keep, None

    def dataset(self):
        cfg, rows = self.cfg, self.rows
        if self._ds is not None or not len(rows):
            return self._ds
        ds = data.dataset(rows, cfg.refs, cfg.uris, False, cfg.data_cfg, cfg.block_rows, encoded=cfg.gpu_decode)
        size = cfg.data_cfg["img_size"]
        if self.keep and (cfg.gpu_decode or len(rows) * 3 * size * size <= KEEP_EVAL_BYTES):
            self._ds = ds = ds.materialize()  # the eval pipeline is deterministic: decode once
        return ds


def _score(model, split: _Split, inputs: step.Inputs, cfg: LoopConfig, device, amp, world: int) -> dict | None:
    """Top-1 and per-class accuracy; None when the dataset has no such split (every rank agrees, so
    none waits in an all-reduce the others skip). The unwrapped module is used: DDP's forward would
    sync buffers and hang on uneven eval shards."""
    if not split.exists:
        return None
    C = cfg.num_classes
    correct = torch.zeros(C, dtype=torch.float64, device=device)
    total = torch.zeros(C, dtype=torch.float64, device=device)
    if (ds := split.dataset()) is not None:
        model.eval()
        for batch in data.batches(ds, cfg.batch_size, device, cfg.gpu_decode):
            step.count_correct(model, batch, inputs, correct, total, amp)
    if world > 1:
        import torch.distributed as dist

        stacked = torch.stack([correct, total])
        dist.all_reduce(stacked)
        correct, total = stacked
    return _accuracy(correct.cpu().numpy(), total.cpu().numpy())


def _accuracy(correct: np.ndarray, total: np.ndarray) -> dict:
    per_class = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    return {"top1": float(correct.sum() / max(total.sum(), 1)),
            "per_class": [None if np.isnan(v) else float(v) for v in per_class]}


def _diverged(loss: float | None, epoch: int, first_step: int, steps: int, device, world: int) -> str | None:
    """The error when the epoch's loss is NaN or inf on any rank (every rank gets the same answer)."""
    bad = loss is not None and not math.isfinite(loss)
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if not bad:
        return None
    try:
        step.check_finite_loss(loss if loss is not None and not math.isfinite(loss) else float("nan"), epoch,
                               first_step, steps)
    except Exception as e:  # noqa: BLE001 - the DiffmixError it raises carries the message
        return str(e)
    return None


def _fail_once(cfg: LoopConfig, epoch: int, rank: int, world: int) -> None:
    """Test hook: rank 1 (or 0 alone) dies once at epoch `_fail_at_epoch`."""
    if cfg._fail_at_epoch == epoch and rank == min(1, world - 1):
        marker = os.path.join(cfg.out, "failed-once")
        if not os.path.exists(marker):  # fire once: the restarted worker must get past it
            open(marker, "w").close()
            os._exit(1)


HOLD_S = 120.0  # test hook only: see _hold_once


def _hold_once(cfg: LoopConfig, epoch: int, rank: int) -> None:
    """Test hook: rank 0 waits once before epoch `_hold_at_epoch` (up to HOLD_S) for a test to kill its
    node. The checkpoint before it is reported: whenever the test sees Ray Train register it and kills
    the node, the run has epochs left to restore into (no race with the epochs after it)."""
    if cfg._hold_at_epoch == epoch and rank == 0:
        marker = os.path.join(cfg.out, "held-once")
        if not os.path.exists(marker):  # once: the restored worker goes on
            open(marker, "w").close()
            time.sleep(HOLD_S)


def train_func(config: dict) -> None:
    """Ray Train's entry point on every worker; `config` carries the run's LoopConfig."""
    _train(config[LOOP_KEY])


def _train(cfg: LoopConfig) -> None:
    import ray.train
    import ray.train.torch
    from ray.data import DataContext

    from ..errors import DiffmixError

    # One dataset per run rather than per epoch, but evaluation still draws bars into the job log.
    DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.gpu_decode and device.type != "cuda":
        raise DiffmixError("--gpu-decode needs a GPU per worker; this worker has none: run without --gpu-decode")
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:  # every training batch has the same shape: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    net = build_model(cfg.arch, cfg.num_classes, cfg.pretrained)
    channels_last = step.use_channels_last(net, device)
    model = ray.train.torch.prepare_model(net.to(memory_format=torch.channels_last) if channels_last else net)
    module = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = cfg.lr_schedule  # the rate is a function of the step count
    criterion = Criterion(cfg.loss, cfg.train_counts, cfg.drw_epoch, cfg.drw_beta, cfg.hard_labels).to(device)
    amp = step.autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    # timm's, or the reference's CutMix/Mixup
    mixup, mix = mixing.from_config(cutmix=cfg.cutmix, mixup=cfg.mixup, mixing=cfg.mixing, mix_prob=cfg.mix_prob,
                                    label_smoothing=cfg.label_smoothing, num_classes=cfg.num_classes)
    uris = cfg.uris
    inputs = step.Inputs(cfg.data_cfg, device, cfg.num_classes, cfg.gamma, cfg.label_smoothing, channels_last,
                         cfg.gpu_decode, mixup, where=lambda b, i: data.where(uris, b["file"][i], b["row"][i]),
                         soft_scaler=cfg.soft_scaler, mix=mix, cmo_prob=CMO_PROB if cfg.cmo else 0.0)

    start_epoch, history, n_steps, selected = 0, [], 0, Selected()
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            state = load_state(os.path.join(d, CKPT_FILE))
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, n_steps = state["epoch"] + 1, state["history"], state["step"]
        selected = Selected.restore(state, cfg.select, cfg.epochs)

    epochs = cfg.epochs
    def rows_of(real_weights=None):  # the main stream, or (weights 1/n_c) CMO's minority stream
        return data.run_rows(cfg.real_rows, cfg.syn_rows, cfg.p, cfg.syn_weights, cfg.seed,
                             range(start_epoch, epochs), rank, world, cfg.batch_size, cfg.own, cfg.drop_last,
                             real_weights)

    rows, steps_per_epoch = rows_of()
    minority = rows_of(cfg.cmo_weights)[0] if cfg.cmo else None
    train_batches = data.training_batches(rows, minority, epochs - start_epoch, cfg, device)
    val = _Split("val", cfg, rank, world, keep=True)
    test = _Split("test", cfg, rank, world, keep=cfg.test_every_epoch)
    every = max(1, int(cfg.checkpoint_every))

    for epoch in range(start_epoch, epochs):
        _fail_once(cfg, epoch, rank, world)
        _hold_once(cfg, epoch, rank)
        started_at, t0 = time.time(), time.perf_counter()
        inputs.cmo_active = cmo_active(epoch, epochs)
        losses = step.train_epoch(model, train_batches, steps_per_epoch, inputs, opt, scaler,
                                  criterion.for_epoch(epoch), schedule.lr, n_steps, amp)
        n_steps += steps_per_epoch
        train_loss = step.mean_loss(losses)  # the epoch's one read of the training loss
        if diverged := _diverged(train_loss, epoch, n_steps - steps_per_epoch, steps_per_epoch, device, world):
            # every rank: end the run without a checkpoint (a restart would diverge again); the driver raises it
            if rank == 0:
                from .. import storage
                from ..contracts import DIVERGED

                storage.write_text_atomic(storage.join(cfg.out, DIVERGED), diverged)
            ray.train.report({"epoch": epoch, "train_loss": train_loss})
            return
        train_seconds = time.perf_counter() - t0
        if world > 1:  # BN running stats drift per rank after DDP's last broadcast: score rank 0's model
            import torch.distributed as dist

            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)
        record = {"epoch": epoch, "train_loss": train_loss,
                  "val": _score(module, val, inputs, cfg, device, amp, world)}
        if cfg.test_every_epoch or not test.exists:  # null: the dataset has no test split
            record["test"] = _score(module, test, inputs, cfg, device, amp, world)
        seen = steps_per_epoch * cfg.batch_size * world
        record |= {"lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                   "train_seconds": train_seconds, "started_at": started_at, "steps": n_steps,
                   # training throughput (all ranks), evaluation excluded
                   "images_per_s": seen / train_seconds if train_seconds else 0.0}
        history = history + [record]
        selected.update(history, cfg.select, epochs, module)
        last = epoch == epochs - 1
        state = None
        if last or (epoch + 1) % every == 0:
            # a copy: _finish loads the selected weights into the module before the last one is saved
            state = checkpoint_state(module, opt, epoch, n_steps, selected)
        if last:  # before the final checkpoint, which must hold the test score it adds
            history = _finish(module, selected, history, test, inputs, cfg, device, amp, rank, world)
        _report(record, state, history, rank)
    if start_epoch >= epochs and history:  # resumed after the final checkpoint: end on it again
        _report(history[-1], None, history, rank)


def checkpoint_state(module, opt, epoch: int, n_steps: int, selected: Selected) -> dict:
    """What a checkpoint holds (plus the history, added when it is written): tensors and plain
    containers only, so that it loads with weights_only=True."""
    return {"model": cpu_copy(module.state_dict()), "optimizer": opt.state_dict(), "epoch": epoch,
            "step": n_steps} | selected.checkpoint_fields(epoch)


def load_state(path: str) -> dict:
    """A checkpoint's state, refused (named) when it needs more than tensors and plain data to load."""
    from ..models.safe_load import load_plain

    return load_plain(path, path)


def _finish(module, selected: Selected, history: list[dict], test: _Split, inputs, cfg: LoopConfig, device, amp,
            rank: int, world: int) -> list[dict]:
    """Score test on the selected weights (once) and write them to best/ (rank 0)."""
    history = [dict(h) for h in history]
    rec = next(h for h in history if h["epoch"] == selected.epoch)
    if selected.weights is not None:
        module.load_state_dict(selected.weights)  # the final checkpoint's state was taken before this
    if test.exists and rec.get("test") is None:
        rec["test"] = _score(module, test, inputs, cfg, device, amp, world)
    if rank == 0 and selected.weights is not None:  # else: an older checkpoint (no selection recorded) left best/ as is
        save_best(cfg.out, selected.weights, model_card(cfg, selected.epoch, rec["val"]["top1"] if rec["val"] else None))
    return history


def _report(record: dict, state: dict | None, history: list[dict], rank: int) -> None:
    """Ray Train's report (a barrier: every rank calls it) with a checkpoint when `state` is given;
    rank 0 writes it."""
    import ray.train

    metrics = {"epoch": record["epoch"], "train_loss": record["train_loss"], "images_per_s": record["images_per_s"]}
    metrics |= {f"{k}_top1": history[-1][k]["top1"] for k in ("val", "test") if history[-1].get(k)}
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if state is not None and rank == 0:
            torch.save(state | {"history": history}, os.path.join(d, CKPT_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def model_card(cfg: LoopConfig, epoch: int, val_top1: float | None) -> dict:
    """What best/model.json says of the selected weights (contracts.CLASSIFIER_MODEL_KEYS and more)."""
    return {"arch": cfg.arch, "num_classes": cfg.num_classes, "epoch": epoch, "val_top1": val_top1,
            "select": cfg.select, "data_cfg": cfg.data_cfg, "dataset_fingerprint": cfg.dataset_fingerprint}


def save_best(out: str, weights: dict, card: dict) -> None:
    """The selected weights and their model card, as `evaluate` and `score --classifier` read them."""
    import io

    from ..classifier_run import write_best

    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in weights.items()}, buf)  # channels_last or not: plain tensors
    write_best(out, buf.getvalue(), card)
