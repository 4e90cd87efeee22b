"""The `train-cls` driver: validate -> claim the output -> load image columns into the object
store -> TorchTrainer.fit (DDP, per-epoch checkpoints, automatic restarts) -> metrics.json
(model selection on val; test reported at the selected epoch) -> _SUCCESS."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .. import canonical, storage
from ..console import console, logger
from ..contracts import COL_LABEL, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL, SUCCESS
from ..errors import DiffmixError
from ..ops.jobs import announce
from ..ops.local_ray import init_ray, resolve_gpus
from ..synthetic import open_synthetic
from . import data, labels
from .config import ClassifyConfig
from .loop import CKPT_FILE, train_func
from .model import build_model, check_arch, data_config

METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"
EXECUTION_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "_fail_at_epoch", "out")


def _identity(cfg: ClassifyConfig, dataset_fp: str, synthetic_fps: list[str]) -> dict:
    """What decides the trained model; execution knobs may change between a run and its resume."""
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_KEYS}
    return ident | {"dataset_fingerprint": dataset_fp, "synthetic_fingerprints": synthetic_fps}


def _load_columns(uris: list[str]) -> list:
    """One Ray task per shard file; the returned objects stay in the cluster's object store."""
    import ray

    task = ray.remote(num_cpus=0.25)(data.load_image_column)
    return [task.remote(u) for u in uris]


def _meta(uris: list[str], columns: list[str]) -> list:
    return [storage.read_parquet(u, columns) for u in uris]


def summarize(history: list[dict], train_counts: list[int], cfg: ClassifyConfig, long_tail: bool) -> dict:
    """Pick the epoch with the best val top-1 (earliest on ties) and report test there."""
    best = max(range(len(history)), key=lambda i: (history[i]["val"]["top1"], -i))
    sel = history[best]
    result = {"selected_epoch": sel["epoch"], "selection": "val top-1", "val_top1": sel["val"]["top1"],
              "test_top1": sel["test"]["top1"], "test_per_class": sel["test"]["per_class"]}
    if long_tail:
        counts = np.asarray(train_counts)
        per_class = np.array([np.nan if v is None else v for v in sel["test"]["per_class"]], dtype=float)
        groups = {"many": counts > cfg.many_threshold, "few": counts < cfg.few_threshold}
        groups["medium"] = ~groups["many"] & ~groups["few"]
        result["test_shot_groups"] = {g: (float(np.nanmean(per_class[m])) if m.any() else None)
                                      for g, m in groups.items()}
    return result


def run_classify(cfg: ClassifyConfig, overwrite: bool = False, resume: bool = False) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    check_arch(cfg.arch)
    out = storage.normalize(cfg.out)
    dataset = canonical.open_dataset(cfg.dataset)
    info = dataset.info
    if info.split_size("val") == 0:
        raise DiffmixError(f"{cfg.dataset} has no val split: model selection needs one (the test split is never "
                           "used for selection). Re-run prepare with --val-fraction > 0")
    syn_sets = [open_synthetic(u, info.fingerprint, cfg.allow_incomplete) for u in cfg.synthetic]
    if cfg.pretrained:
        build_model(cfg.arch, info.num_classes, cfg.pretrained)  # a wrong file fails here, not in N workers
    identity = _identity(cfg, info.fingerprint, [s.manifest.get("identity", {}).get("model_fingerprint", "")
                                                 + ":" + storage.normalize(s.uri) for s in syn_sets])
    resumed = storage.claim_output(out, "train-cls", identity, overwrite)
    announce("train-cls", storage.config_hash(identity))  # inside a Ray job: where to watch it, which run it is
    if resumed and storage.exists(storage.join(out, SUCCESS)):
        console.print(f"{out} already holds this finished classifier run")
        return storage.read_json(storage.join(out, METRICS_JSON))
    if resumed and not resume:
        raise DiffmixError(f"{out} holds an unfinished train-cls run of this config: pass --resume to continue it "
                           "from its last epoch checkpoint, or --overwrite to start again")
    if resume and not resumed:
        raise DiffmixError(f"--resume: {out} holds no earlier run of this config to continue")

    init_ray(min_cpus=cfg.workers * cfg.cpus_per_worker)
    gpus = resolve_gpus(cfg.gpus_per_worker, "train-cls", "worker")
    train_files = dataset.files("train")
    syn_files = [f for s in syn_sets for f in s.files]
    val_files, test_files = dataset.files("val"), dataset.files("test")
    all_files = train_files + syn_files + val_files + test_files
    refs = _load_columns(all_files)
    offsets = np.cumsum([0, len(train_files), len(syn_files), len(val_files)])
    real = data.rows_of(_meta(train_files, [COL_LABEL]), 0, False)
    syn = data.rows_of(_meta(syn_files, [COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH]), int(offsets[1]), True)
    val = data.rows_of(_meta(val_files, [COL_LABEL]), int(offsets[2]), False)
    test = data.rows_of(_meta(test_files, [COL_LABEL]), int(offsets[3]), False)
    train_counts = info.class_counts("train")
    p = cfg.resolved_p(info.subset.get("kind")) if len(syn) else 0.0
    syn_weights = (labels.synthetic_row_weights(syn.target, info.num_classes, cfg.synthetic_sampling,
                                                np.asarray(train_counts)) if len(syn) else None)
    console.print(f"train-cls {cfg.arch}: {len(real)} real train images, {len(syn)} synthetic from "
                  f"{len(syn_sets)} run(s), p={p}, gamma={cfg.gamma}, {cfg.workers} worker(s), {cfg.epochs} epochs")
    loop_cfg = dataclasses.asdict(cfg) | {
        "num_classes": info.num_classes, "refs": refs, "real_rows": real, "syn_rows": syn, "val_rows": val,
        "test_rows": test, "p": p, "syn_weights": syn_weights, "data_cfg": data_config(cfg.arch, cfg.img_size),
        "block_rows": max(cfg.batch_size, 32), "out": out, "fail_marker_dir": out,
        "dataset_fingerprint": info.fingerprint}
    fs, path = storage.arrow_filesystem(storage.join(out, "train"))
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": gpus}),
        run_config=RunConfig(name=f"train-cls-{storage.config_hash(identity)[:10]}", storage_path=path,
                             storage_filesystem=fs if storage.is_s3(out) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.error:
        raise DiffmixError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False)["history"]
    metrics = {"arch": cfg.arch, "dataset": dataset.uri, "dataset_fingerprint": info.fingerprint,
               "synthetic": [s.uri for s in syn_sets], "p": p, "gamma": cfg.gamma, "seed": cfg.seed,
               "classes": info.classes, "train_counts": train_counts, "epochs": history,
               "summary": summarize(history, train_counts, cfg, info.subset.get("kind") == "long-tail"),
               "config": dataclasses.asdict(cfg)}
    storage.write_json_atomic(storage.join(out, METRICS_JSON), metrics)
    storage.write_text_atomic(storage.join(out, SUCCESS), "")
    s = metrics["summary"]
    console.print(f"[green]selected epoch {s['selected_epoch']} by val top-1 {s['val_top1']:.3f}: "
                  f"test top-1 {s['test_top1']:.3f}[/green] -> {out}")
    return metrics


def run_seeds(cfg: ClassifyConfig, seeds: list[int], overwrite: bool = False, resume: bool = False) -> dict:
    """One run per seed under <out>/seed-<s>/, then mean ± std of the selected test top-1."""
    out = storage.normalize(cfg.out)
    storage.claim_output(out, "train-cls-seeds", dataclasses.asdict(cfg) | {"seeds": seeds}, overwrite)
    runs = []
    for seed in seeds:
        sub = dataclasses.replace(cfg, seed=seed, out=storage.join(out, f"seed-{seed}"))
        done = storage.exists(storage.join(sub.out, SUCCESS))
        runs.append(run_classify(sub, overwrite=False, resume=resume and not done))
    tops = np.array([r["summary"]["test_top1"] for r in runs])
    vals = np.array([r["summary"]["val_top1"] for r in runs])
    summary = {"seeds": seeds, "test_top1_mean": float(tops.mean()), "test_top1_std": float(tops.std(ddof=0)),
               "val_top1_mean": float(vals.mean()), "runs": [storage.join(out, f"seed-{s}") for s in seeds]}
    storage.write_json_atomic(storage.join(out, SUMMARY_JSON), summary)
    logger.info("test top-1 over %d seeds: %.4f ± %.4f", len(seeds), summary["test_top1_mean"], summary["test_top1_std"])
    return summary
