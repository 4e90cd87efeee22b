"""The `train-cls` driver: validate -> resolve the recipe (recipe.py) -> claim the output -> load image
columns into the object store -> TorchTrainer.fit (DDP, a checkpoint every --checkpoint-every epochs and
after the last, automatic restarts) -> metrics.json (the epoch chosen by --select; test reported
there) -> _SUCCESS."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from rich.markup import escape

from .. import canonical, classifier_run, config, lease, storage
from ..console import console, logger
from ..contracts import (COL_IMAGE_ID, COL_LABEL, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL,
                         DIVERGED)
from ..errors import DiffmixError
from ..runtime.jobs import announce
from ..runtime.local_ray import init_ray, resolve_gpus
from ..runtime.shared_paths import check_shared_paths
from ..synthetic import open_synthetic
from . import data, filters, labels
from .config import GPU_DECODE_ON_CPU, ClassifyConfig
from .loop import CKPT_FILE, LOOP_KEY, load_state, train_func
from .loop_config import LoopConfig
from .model import FROM_SCRATCH, build_model, check_arch, describe_weights
from .recipe import check_splits, resolve
from .summary import mean_std, result_line, summarize

# Options added after runs were written (config.UNLESS_DEFAULT): at their defaults they stay out of the
# identity, so those runs resume.
LATER_OPTIONS = {f.name: f.default for f in dataclasses.fields(ClassifyConfig)
                 if config.option_of(f) is not None and config.option_of(f).identity == config.UNLESS_DEFAULT}
# The execution options added after multi-seed runs were written (their claim, _seeds_identity).
NEW_EXECUTION_KEYS = ("gpu_decode", "checkpoint_every", "test_every_epoch")


def _config(cfg: ClassifyConfig) -> dict:
    """The whole config as a multi-seed run's claim has always recorded it: later options only off their
    defaults, the filter's keys only with a filter."""
    unfiltered = () if cfg.synthetic_filter else ("synthetic_filter", "scores")
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in unfiltered and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}


def _identity(cfg: ClassifyConfig, dataset_fp: str, synthetic_fps: list[str], selection) -> dict:
    """What decides the trained model (cfg.identity(), from the options' metadata) and what its inputs
    hold. With a filter, the scores it read: other scores under the same name keep other images."""
    ident = cfg.identity() | {"dataset_fingerprint": dataset_fp, "synthetic_fingerprints": synthetic_fps}
    return ident | ({"scores_fingerprints": filters.scores_identity(selection.record)} if selection else {})


def _input_uris(cfg: ClassifyConfig) -> storage.Inputs:
    """Every input a run reads (its --out may be none of them, nor hold or sit inside one)."""
    pretrained = None if cfg.pretrained == FROM_SCRATCH else cfg.pretrained  # "none" names no file
    return {"--dataset": cfg.dataset, "--synthetic": cfg.synthetic, "--pretrained": pretrained}


def _load_columns(uris: list[str]) -> list:
    """One Ray task per shard file; the returned objects stay in the cluster's object store."""
    import ray

    task = ray.remote(num_cpus=0.25)(data.load_image_column)
    return [task.remote(u) for u in uris]


def _meta(uris: list[str], columns: list[str]) -> list:
    return [storage.read_parquet(u, columns) for u in uris]


def _inputs(dataset: canonical.Dataset, syn_sets: list) -> tuple[list[str], dict[str, data.Rows]]:
    """Every image file the run reads (train, synthetic, val, test, in that order) and the rows of
    each part, read from the label columns only: no image bytes, no Ray."""
    parts = {"train": dataset.files("train"), "syn": [f for s in syn_sets for f in s.files],
             "val": dataset.files("val"), "test": dataset.files("test")}
    rows, offset = {}, 0
    for name, files in parts.items():
        cols = [COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH] if name == "syn" else [COL_LABEL]
        rows[name] = data.rows_of(_meta(files, cols), offset, name == "syn")
        offset += len(files)
    return [f for files in parts.values() for f in files], rows


def _own_translations(cfg: ClassifyConfig, dataset: canonical.Dataset, syn_sets: list, kept) -> tuple:
    """--synthetic-pick own-source: each train image's translations (labels.own_index), in the row
    order _inputs reads (of the rows a filter kept). Refused when no train image has one (e.g.
    text-to-image shards)."""
    real_ids = [i for t in _meta(dataset.files("train"), [COL_IMAGE_ID]) for i in t.column(COL_IMAGE_ID).to_pylist()]
    source_ids = [i for s in syn_sets for t in _meta(s.files, [COL_SOURCE_ID]) for i in t.column(COL_SOURCE_ID).to_pylist()]
    if kept is not None:
        source_ids = [source_ids[i] for i in kept]
    start, rows = labels.own_index(real_ids, source_ids)
    with_own = int(np.count_nonzero(np.diff(start)))
    if not with_own:
        raise DiffmixError(f"--synthetic-pick own-source: no train image of {cfg.dataset} has a translation in "
                           f"{', '.join(cfg.synthetic)} (text-to-image modes have no source image); use an img2img "
                           "generate output of this dataset (e.g. --mode da-fusion), or --synthetic-pick pool")
    console.print(f"synthetic pick own-source: {with_own} of {len(real_ids)} train images have their own "
                  f"translations ({len(rows)} in all); the others are never replaced", highlight=False)
    return start, rows


@lease.scoped  # the output has one writer while this runs, and none after
def run_classify(cfg: ClassifyConfig, overwrite: bool = False, resume: bool = False) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    check_arch(cfg.arch)
    out = storage.normalize(cfg.out)
    dataset = canonical.open_dataset(cfg.dataset)
    info = dataset.info
    ignored = check_splits(cfg, info, cfg.dataset)
    syn_sets = [open_synthetic(u, info.fingerprint, cfg.allow_incomplete) for u in cfg.synthetic]
    weights = describe_weights(cfg.pretrained)  # a missing file fails here, and its sha256 goes on record
    if weights["file"]:
        build_model(cfg.arch, info.num_classes, cfg.pretrained)  # a wrong file fails here, not in N workers
    all_files, rows = _inputs(dataset, syn_sets)
    real, syn = rows["train"], rows["syn"]
    selection = None
    if cfg.synthetic_filter:
        selection = filters.select(filters.parse(cfg.synthetic_filter), syn_sets, cfg.score_names(), syn.source,
                                   syn.target, cfg.allow_incomplete)
    if selection is not None:  # the shards stay as they are: the run reads only the rows kept
        syn = rows["syn"] = syn.take(selection.rows)
    recipe = resolve(cfg, info, len(real), len(syn))  # a bad combination fails before the output is claimed
    own = (_own_translations(cfg, dataset, syn_sets, selection.rows if selection else None)
           if cfg.synthetic_pick == "own-source" else None)
    identity = _identity(cfg, info.fingerprint, [s.manifest.get("identity", {}).get("model_fingerprint", "")
                                                 + ":" + storage.normalize(s.uri) for s in syn_sets], selection)
    if weights["sha256"]:  # other weights under the same path are another run
        identity["pretrained_sha256"] = weights["sha256"]
    if cfg.lr_scaling == "linear":  # the rate then depends on the worker count, which otherwise may change
        identity["global_batch"] = cfg.batch_size * cfg.workers
    gpus = None
    if cfg.gpu_decode:  # refused before the output is claimed, which means asking Ray about GPUs now
        init_ray(min_cpus=cfg.workers * cfg.cpus_per_worker)
        gpus = resolve_gpus(cfg.gpus_per_worker, "train-cls", "worker")
        if gpus <= 0:
            raise DiffmixError(GPU_DECODE_ON_CPU.format(why="the Ray cluster has no GPUs, nor can its autoscaler "
                                                            "add any"))
    resumed = storage.claim_output(out, "train-cls", identity, overwrite, inputs=_input_uris(cfg))
    announce("train-cls", storage.config_hash(identity))  # inside a Ray job: where to watch it, which run it is
    if resumed and classifier_run.is_finished(out):
        console.print(f"{out} already holds this finished classifier run")
        return classifier_run.read_metrics(out)
    if resume and not resumed:  # the same config resumes anyway; --resume insists on it
        raise DiffmixError(f"--resume: {out} holds no earlier run of this config to continue; drop --resume to "
                           "start one")
    if resumed:
        console.print(f"{out} holds an unfinished run of this config: continuing from its last epoch checkpoint")

    if gpus is None:
        init_ray(min_cpus=cfg.workers * cfg.cpus_per_worker)
        gpus = resolve_gpus(cfg.gpus_per_worker, "train-cls", "worker")
    check_shared_paths("train-cls", [("--dataset", cfg.dataset), *(("--synthetic", s) for s in cfg.synthetic),
                                     ("--pretrained", cfg.pretrained)], out)
    refs = _load_columns(all_files)
    train_counts = info.class_counts("train")
    syn_weights = (labels.synthetic_row_weights(syn.target, info.num_classes, recipe.synthetic_sampling,
                                                np.asarray(train_counts)) if len(syn) and own is None else None)
    console.print(f"train-cls {cfg.arch}: {len(real)} real train images, {len(syn)} synthetic from "
                  f"{len(syn_sets)} run(s), p={recipe.p}, gamma={cfg.gamma}, {cfg.workers} worker(s), "
                  f"{cfg.epochs} epochs")
    said = [ignored] if ignored else []
    said.append(f"backbone weights: {weights['file']} (sha256 {weights['sha256'][:12]})" if weights["file"]
                else f"backbone weights: {weights['init']}")
    for line in recipe.notes + said + ([filters.describe(selection.record)] if selection else []):
        console.print(line, highlight=False)
    loop_cfg = LoopConfig.of(
        cfg, out=out, num_classes=info.num_classes, dataset_fingerprint=info.fingerprint, data_cfg=recipe.data_cfg,
        lr_schedule=recipe.schedule, train_counts=train_counts, drw_epoch=recipe.drw_epoch,
        hard_labels=recipe.hard_labels, p=recipe.p, refs=refs, uris=all_files, block_rows=max(cfg.batch_size, 32),
        real_rows=real, syn_rows=syn, val_rows=rows["val"], test_rows=rows["test"], syn_weights=syn_weights, own=own,
        cmo_weights=labels.minority_weights(real.target, train_counts) if cfg.cmo else None)
    fs, path = storage.arrow_filesystem(storage.join(out, "train"))
    trainer = TorchTrainer(
        train_func, train_loop_config={LOOP_KEY: loop_cfg},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": gpus}),
        run_config=RunConfig(name=f"train-cls-{storage.config_hash(identity)[:10]}", storage_path=path,
                             storage_filesystem=fs if storage.is_s3(out) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    storage.remove_tree(storage.join(out, DIVERGED))  # an earlier attempt's: this one decides again
    result = trainer.fit()
    if result.error:
        raise DiffmixError(f"training failed: {result.error}")
    if storage.exists(diverged := storage.join(out, DIVERGED)):  # stopped by the loop: never marked complete
        raise DiffmixError(storage.read_text(diverged))
    with result.checkpoint.as_directory() as d:
        history = load_state(os.path.join(d, CKPT_FILE))["history"]
    metrics = {"arch": cfg.arch, "weights": weights, "dataset": dataset.uri, "dataset_fingerprint": info.fingerprint,
               "synthetic": [s.uri for s in syn_sets], "synthetic_filter": selection.record if selection else None,
               "p": recipe.p, "gamma": cfg.gamma, "seed": cfg.seed,
               "select": cfg.select, "loss": cfg.loss, "synthetic_sampling": recipe.synthetic_sampling,
               "lr_scaling": cfg.lr_scaling, "peak_lr": recipe.schedule.peak_lr, "splits": info.splits,
               "classes": info.classes, "train_counts": train_counts, "epochs": history,
               "summary": summarize(history, train_counts, cfg.select, recipe.thresholds),
               "resolved": recipe.resolved, "config": dataclasses.asdict(cfg)}
    classifier_run.write_metrics(out, metrics)
    classifier_run.mark_finished(out)
    console.print(f"[green]{escape(result_line(metrics['summary']))}[/green] -> {escape(out)}", markup=True,
                  highlight=False)
    return metrics


@lease.scoped  # the output has one writer while this runs, and none after
def run_seeds(cfg: ClassifyConfig, seeds: list[int], overwrite: bool = False, resume: bool = False) -> dict:
    """One run per seed under <out>/seed-<s>/, then mean ± std of the selected test top-1."""
    if repeated := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise DiffmixError(f"--seeds lists seed {repeated[0]} twice: it would be trained once and counted twice in "
                           "the mean ± std; list each seed once")
    if not seeds:
        raise DiffmixError("--seeds lists no seed; give comma-separated seeds, e.g. 2020,2021,2022")
    out = storage.normalize(cfg.out)
    # without the execution options added later (NEW_EXECUTION_KEYS), so multi-seed runs started by an
    # older version still resume
    ident = {k: v for k, v in _config(cfg).items() if k not in NEW_EXECUTION_KEYS}
    storage.claim_output(out, "train-cls-seeds", ident | {"seeds": seeds}, overwrite, inputs=_input_uris(cfg))
    runs = []
    for seed in seeds:
        sub = dataclasses.replace(cfg, seed=seed, out=storage.join(out, f"seed-{seed}"))
        done = classifier_run.is_finished(sub.out)
        runs.append(run_classify(sub, overwrite=False, resume=resume and not done))
    test_mean, test_std = mean_std([r["summary"]["test_top1"] for r in runs])
    val_mean, _ = mean_std([r["summary"]["val_top1"] for r in runs])
    summary = {"seeds": seeds, "test_top1_mean": test_mean, "test_top1_std": test_std, "val_top1_mean": val_mean,
               "runs": [storage.join(out, f"seed-{s}") for s in seeds]}
    classifier_run.write_seeds_summary(out, summary)
    if test_mean is None:
        logger.info("no test top-1 over %d seeds: the dataset has no test split", len(seeds))
    else:
        logger.info("test top-1 over %d seeds: %.4f ± %.4f", len(seeds), test_mean, test_std)
    return summary
