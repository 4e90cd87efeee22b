"""The per-worker classifier training function (Ray Train V2). Epoch-granular resume: the data
iterator's position is not checkpointed, the epoch is."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from . import data
from .losses import Criterion
from .model import build_model

CKPT_FILE = "state.pt"
BEST_DIR = "best"  # <out>/best/model.pt + model.json: the selected weights (best val, or the last epoch)


def _evaluate(model, rows: data.Rows, cfg: dict, device) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (correct, total) over this rank's rows, summed over ranks by all-reduce. The
    unwrapped module is used: DDP's forward would sync buffers and hang on uneven eval shards."""
    import ray.train
    import torch.distributed as dist

    C = cfg["num_classes"]
    correct = torch.zeros(C, dtype=torch.float64)
    total = torch.zeros(C, dtype=torch.float64)
    if len(rows):
        ds = data.epoch_dataset(rows, cfg["refs"], cfg["uris"], C, 1.0, 0.0, False, cfg["data_cfg"], cfg["block_rows"])
        model.eval()
        with torch.no_grad():
            for batch in ds.iter_torch_batches(batch_size=cfg["batch_size"], device=device):
                pred = model(batch["image"]).argmax(1).cpu()
                lab = batch["label"].cpu()
                total += torch.bincount(lab, minlength=C).double()
                correct += torch.bincount(lab[pred == lab], minlength=C).double()
    if ray.train.get_context().get_world_size() > 1:
        stacked = torch.stack([correct, total]).to(device)
        dist.all_reduce(stacked)
        correct, total = stacked.cpu()
    return correct.numpy(), total.numpy()


def _score(model, split: str, cfg: dict, device, rank: int, world: int) -> dict | None:
    """Top-1 and per-class accuracy on `split`; None when the dataset has no such split (every rank
    agrees on that, so none waits in an all-reduce the others skip)."""
    rows = cfg[f"{split}_rows"]
    if not len(rows):
        return None
    return _accuracy(*_evaluate(model, data.Rows(*[a[rank::world] for a in _cols(rows)]), cfg, device))


def _accuracy(correct: np.ndarray, total: np.ndarray) -> dict:
    per_class = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    return {"top1": float(correct.sum() / max(total.sum(), 1)),
            "per_class": [None if np.isnan(v) else float(v) for v in per_class]}


def train_func(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from timm.data import Mixup

    from ray.data import DataContext

    # Per-epoch datasets would each draw progress bars into the job log; the dashboard has them.
    DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"] + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    model = ray.train.torch.prepare_model(build_model(cfg["arch"], cfg["num_classes"], cfg["pretrained"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    real, syn = cfg["real_rows"], cfg["syn_rows"]
    schedule = cfg["lr_schedule"]  # schedule.Schedule: the rate is a function of the step count
    criterion = Criterion(cfg["loss"], cfg["train_counts"], cfg["drw_epoch"], cfg["drw_beta"], cfg["hard_labels"])
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    mixup = None
    if cfg["cutmix"] or cfg["mixup"]:
        mixup = Mixup(mixup_alpha=1.0 if cfg["mixup"] else 0.0, cutmix_alpha=1.0 if cfg["cutmix"] else 0.0,
                      prob=0.5, label_smoothing=cfg["label_smoothing"], num_classes=cfg["num_classes"])

    start_epoch, history, step = 0, [], 0
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False)
        model.module.load_state_dict(state["model"]) if hasattr(model, "module") else model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, step = state["epoch"] + 1, state["history"], state["step"]

    for epoch in range(start_epoch, cfg["epochs"]):
        if cfg.get("_fail_at_epoch") == epoch and rank == min(1, world - 1):
            marker = os.path.join(cfg["fail_marker_dir"], "failed-once")
            if not os.path.exists(marker):  # fire once: the restarted worker must get past it
                open(marker, "w").close()
                os._exit(1)
        t0 = time.perf_counter()
        rows = data.epoch_rows(real, syn, cfg["p"], cfg["syn_weights"], cfg["seed"], epoch, rank, world,
                               cfg.get("own"))
        ds = data.epoch_dataset(rows, cfg["refs"], cfg["uris"], cfg["num_classes"], cfg["gamma"],
                                cfg["label_smoothing"], True, cfg["data_cfg"], cfg["block_rows"])
        loss_fn = criterion.for_epoch(epoch)
        model.train()
        losses, seen = [], 0
        for batch in ds.iter_torch_batches(batch_size=cfg["batch_size"], drop_last=True, device=device,
                                           prefetch_batches=2):
            x, y = batch["image"], batch["target"]
            if mixup is not None:
                x, y = mixup(x, batch["label"])
            for group in opt.param_groups:
                group["lr"] = schedule.lr(step)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
            loss = loss_fn(logits, y, batch["label"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            losses.append(float(loss.detach()))
            seen += len(x)
        train_seconds = time.perf_counter() - t0
        eval_model = model.module if hasattr(model, "module") else model
        if world > 1:  # BN running stats drift per rank after DDP's last broadcast: score rank 0's model
            import torch.distributed as dist

            for buf in eval_model.buffers():
                dist.broadcast(buf.data, src=0)
        val = _score(eval_model, "val", cfg, device, rank, world)
        test = _score(eval_model, "test", cfg, device, rank, world)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val": val,
                  "test": test, "lr": opt.param_groups[0]["lr"], "seconds": seconds,
                  "train_seconds": train_seconds, "steps": step,
                  # training throughput (all ranks), evaluation excluded
                  "images_per_s": seen * world / train_seconds if train_seconds else 0.0}
        history = history + [record]
        metrics = {"epoch": epoch, "train_loss": record["train_loss"], "images_per_s": record["images_per_s"]}
        metrics |= {f"{k}_top1": r["top1"] for k, r in (("val", val), ("test", test)) if r is not None}
        if rank == 0 and _selected_so_far(history, cfg["select"], cfg["epochs"]):  # the weights `evaluate` scores
            save_best(cfg["out"], eval_model, epoch, val["top1"] if val else None, cfg)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:  # one writer; every rank reports (report is a barrier)
                torch.save({"model": eval_model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "step": step}, os.path.join(d, CKPT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _selected_so_far(history: list[dict], select: str, epochs: int) -> bool:
    """Whether the epoch just recorded is the one the run reports, as far as it knows: the best val
    top-1 so far (earliest on ties), or, with --select last, the final epoch."""
    if select == "last":
        return history[-1]["epoch"] == epochs - 1
    best_before = max((h["val"]["top1"] for h in history[:-1]), default=-1.0)
    return history[-1]["val"]["top1"] > best_before


def save_best(out: str, model, epoch: int, val_top1: float | None, cfg: dict) -> None:
    import io
    import json

    from .. import storage

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes_atomic(storage.join(out, BEST_DIR, "model.pt"), buf.getvalue())
    meta = {"arch": cfg["arch"], "num_classes": cfg["num_classes"], "epoch": epoch, "val_top1": val_top1,
            "select": cfg["select"], "data_cfg": cfg["data_cfg"], "dataset_fingerprint": cfg["dataset_fingerprint"]}
    storage.write_text_atomic(storage.join(out, BEST_DIR, "model.json"), json.dumps(meta, indent=2))


def _cols(rows: data.Rows) -> list[np.ndarray]:
    return [getattr(rows, c) for c in data.COLS]
