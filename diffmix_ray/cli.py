"""The `diffmix-ray` command line: one thin command per stage, no logic beyond parsing and calling."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer
from rich.markup import escape

from .console import console, setup_logging
from .errors import DiffmixError

app = typer.Typer(help="Diff-Mix inter-class image translation as a distributed batch system on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
model_app = typer.Typer(help="Model utilities (tiny/bench/sd15 presets, CLIP presets, the trained sample models, "
                        "staging).", no_args_is_help=True)
app.add_typer(model_app, name="model")
recipe_app = typer.Typer(help="The paper's settings as recipes for `run` (jobs/configs/paper/).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def friendly(fn):
    """Print a DiffmixError as one clear message (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except DiffmixError as e:
            console.print(f"[bold red]error:[/bold red] {escape(str(e))}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _read_class_names(path: Optional[str]) -> Optional[tuple[str, ...]]:
    if path is None:
        return None
    from . import storage

    names = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    if not names:
        raise DiffmixError(f"--class-names {path} lists no names (one class name per line)")
    return tuple(names)


@app.command()
@friendly
def prepare(
    out: str = typer.Option(..., help="Output URI (local path or s3://bucket/prefix) of the canonical dataset."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="imagefolder | cub | flowers102 | parquet."),
    source: Optional[str] = typer.Option(None, help="Raw dataset path or s3:// URI."),
    from_: Optional[str] = typer.Option(None, "--from", help="Derive a subset of this canonical dataset instead."),
    shots: Optional[int] = typer.Option(None, help="Derived: K train images per class (few-shot)."),
    imbalance_ratio: Optional[float] = typer.Option(None, help="Derived: long-tail with imbalance ratio R (e.g. 100)."),
    long_tail: Optional[str] = typer.Option(None, help="Derived, with --imbalance-ratio: reference (default; the Diff-Mix "
                                            "code's avg*(1/R)^(i/(C-2)), classes by size) or geometric "
                                            "(n_max*R^(-i/(C-1)), seeded class order)."),
    shot_thresholds: Optional[str] = typer.Option(None, help="MANY,FEW: many = more than MANY train images, few = fewer "
                                                  "than FEW; default flowers102 30,10, others 20,5 (derived: the "
                                                  "parent's). Recorded in dataset.json."),
    split: Optional[str] = typer.Option(None, help="flowers102: official (trn/val/tst, default) or reference (the "
                                        "Diff-Mix code's seeded 50/50 per class over all images)."),
    seed: Optional[int] = typer.Option(None, help="Seed for split carving, the Flowers-102 reference split and subsets (default 0)."),
    super_class: Optional[str] = typer.Option(None, help="Word used in prompts for every class (bird, flower, ...)."),
    val_fraction: Optional[float] = typer.Option(None, help="Val share carved from train when the source has no val split (default 0.1; 0 = no val split)."),
    test_fraction: Optional[float] = typer.Option(None, help="Test share carved from train when the source has no test split (default 0)."),
    on_bad_image: Optional[str] = typer.Option(None, help="fail (default: list every bad file) or skip (count them)."),
    image_column: Optional[str] = typer.Option(None, help="Parquet: image column (bytes or {bytes,path}); default 'image'."),
    label_column: Optional[str] = typer.Option(None, help="Parquet: integer label column; default 'label'."),
    split_column: Optional[str] = typer.Option(None, help="Parquet: optional split column (train/val/test)."),
    id_column: Optional[str] = typer.Option(None, help="Parquet: optional unique image id column."),
    class_names: Optional[str] = typer.Option(None, help="File with one class name per line, in label order."),
    name: Optional[str] = typer.Option(None, help="Dataset name recorded in dataset.json."),
    config: Optional[str] = typer.Option(None, help="YAML file with any of these options."),
    overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Read a raw dataset (or a canonical one, with --from) and write the canonical dataset."""
    from . import config as cfgmod
    from .data import prepare as prep

    raw_only = {"--source": source, "--format": format, "--super-class": super_class, "--val-fraction": val_fraction,
                "--test-fraction": test_fraction, "--on-bad-image": on_bad_image, "--image-column": image_column,
                "--label-column": label_column, "--split-column": split_column, "--id-column": id_column,
                "--class-names": class_names, "--split": split}
    if from_ is not None:
        if given := [flag for flag, value in raw_only.items() if value is not None]:
            raise DiffmixError(f"--from derives from a canonical dataset, whose splits and images are fixed; "
                               f"{', '.join(given)} only apply when reading a raw source: drop them")
        cfg = cfgmod.build(prep.DeriveConfig, config, dict(
            parent=from_, shots=shots, imbalance_ratio=imbalance_ratio, seed=seed, name=name, long_tail=long_tail,
            shot_thresholds=shot_thresholds))
        info = prep.derive(cfg, out, overwrite=overwrite)
    else:
        if shots is not None or imbalance_ratio is not None or long_tail is not None:
            raise DiffmixError("--shots/--imbalance-ratio/--long-tail derive a subset of a canonical dataset: "
                               "prepare the full dataset first, then pass --from URI")
        cfg = cfgmod.build(prep.PrepareConfig, config, dict(
            format=format, source=source, super_class=super_class, name=name, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=seed, on_bad_image=on_bad_image, image_column=image_column,
            label_column=label_column, split_column=split_column, id_column=id_column,
            class_names=_read_class_names(class_names), split=split, shot_thresholds=shot_thresholds))
        info = prep.prepare(cfg, out, overwrite=overwrite, show_progress=not quiet)
    _print_dataset_summary(out, info)


def _print_dataset_summary(out: str, info) -> None:
    from rich.table import Table

    table = Table(title=f"{info.name}: {info.num_classes} classes, super class '{info.super_class}'")
    for col in ("split", "images", "min/class", "max/class"):
        table.add_column(col)
    for split in ("train", "val", "test"):
        if split in info.counts:
            counts = info.class_counts(split)
            table.add_row(split, str(sum(counts)), str(min(counts)), str(max(counts)))
    console.print(table)
    absent = [s for s in ("val", "test") if not info.has_split(s)]
    if absent:
        console.print(f"no {' or '.join(absent)} split")
    if info.subset.get("kind") == "long-tail":
        console.print(f"long tail: {info.subset.get('construction', 'geometric')} construction, "
                      f"imbalance ratio {info.subset['imbalance_ratio']:g}")
    if info.shot_thresholds:
        console.print(f"many/medium/few: more than {info.shot_thresholds['many']} / otherwise / fewer than "
                      f"{info.shot_thresholds['few']} train images")
    skipped = info.skipped.get("bad_files", 0)
    console.print(f"fingerprint {info.fingerprint[:16]}  skipped bad files: {skipped}  -> {out}")


def _floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DiffmixError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.3,0.5,0.7") from None
    if not values:  # an empty list would silently mean "not given"
        raise DiffmixError(f"{flag} {text!r} lists no number; give comma-separated numbers, e.g. 0.3,0.5,0.7")
    return values


def _generate_config(config: Optional[str] = None, **flags):
    from . import config as cfgmod
    from .generate.config import GenerateConfig

    for key in ("strength_set", "strength_beta"):
        flags[key] = _floats(flags[key], "--" + key.replace("_", "-"))
    return cfgmod.build(GenerateConfig, config, flags)


# Options shared by `generate` and `plan` (plan = the same arguments, no generation).
GENERATE_OPTIONS = dict(
    dataset=typer.Option(None, help="Canonical dataset URI (from `prepare`)."),
    model=typer.Option(None, help="Base model: sample (trained on the sample world) | tiny | bench | sd15 (random "
                       "weights) | a diffusers folder | s3://... (default tiny)."),
    concepts=typer.Option(None, help="Concept bank URI (from `finetune`); needed by diff-* and da-fusion modes."),
    out=typer.Option(None, help="Output URI for plan/, shards/, manifest.json, _SUCCESS."),
    config=typer.Option(None, help="YAML file with any of these options (flags override it)."),
    mode=typer.Option(None, help="diff-mix (default) | diff-aug | diff-gen | real-mix | real-aug | real-gen | da-fusion."),
    multiplier=typer.Option(None, help="Pairs = multiplier x train images (default 5)."),
    per_image=typer.Option(None, help="Instead: M pairs for every train image."),
    source_sampling=typer.Option(None, help="class-uniform (the reference's) | per-image (evenly over images: the "
                                 "long-tailed image distribution). Default: per-image on long-tailed datasets, "
                                 "class-uniform otherwise."),
    target_sampling=typer.Option(None, help="uniform | inverse-frequency (weights 1/(n_c+1), for long-tail)."),
    strength=typer.Option(None, help="Fixed translation strength in (0, 1] (default 0.7)."),
    strength_set=typer.Option(None, help="Comma-separated strengths sampled uniformly, e.g. 0.3,0.5,0.7,0.9."),
    strength_beta=typer.Option(None, help="a,b: strength ~ Beta(a, b) clipped to [0.1, 0.9]."),
    seed=typer.Option(None, help="Run seed: fixes the plan and every pair's noise (default 0)."),
    steps=typer.Option(None, help="DPM-Solver++ steps (default 25; img2img runs int(steps x strength))."),
    guidance=typer.Option(None, help="Classifier-free guidance scale (default 7.5)."),
    prompt_template=typer.Option(None, help="Override the prompt, with {token} and {super_class}."),
    batch_size=typer.Option(None, help="Pairs per translation call (default 8)."),
    min_actors=typer.Option(None, help="Translation actors, autoscaling minimum (default 1)."),
    max_actors=typer.Option(None, help="Translation actors, autoscaling maximum (default 1)."),
    gpus_per_actor=typer.Option(None, help="GPUs per actor (fractions pack several per GPU). Default: 1 when the Ray "
                                "cluster has GPUs or its autoscaler can add them, else 0 (CPU, fp32)."),
    cpus_per_actor=typer.Option(None, help="CPUs per actor; on CPU the actor runs one single-threaded stream of "
                                "device batches per CPU (default 1)."),
    memory_per_actor_gb=typer.Option(None, help="Host memory reserved per actor, so Ray does not over-pack nodes."),
    rows_per_shard=typer.Option(None, help="Images per Parquet shard (default 1000)."),
    jpeg_quality=typer.Option(None, help="JPEG quality of generated images (default 95)."),
    limit=typer.Option(None, help="Only the first N pairs of the plan (smoke runs)."),
    compile=typer.Option(None, "--compile/--no-compile", help="torch.compile the UNet: minutes per actor at start, "
                         "faster batches after (batches are padded to --batch-size). Default off."),
    compile_cache=typer.Option(None, help="URI (folder or s3://) where the first actor stores its compiled kernels "
                               "and the others load them, so they start warm. Needs --compile."),
)
GENERATE_TYPES = dict(dataset=Optional[str], model=Optional[str], concepts=Optional[str], out=Optional[str],
                      config=Optional[str], mode=Optional[str], multiplier=Optional[float], per_image=Optional[int],
                      source_sampling=Optional[str], target_sampling=Optional[str], strength=Optional[float],
                      strength_set=Optional[str], strength_beta=Optional[str], seed=Optional[int],
                      steps=Optional[int], guidance=Optional[float], prompt_template=Optional[str],
                      batch_size=Optional[int], min_actors=Optional[int], max_actors=Optional[int],
                      gpus_per_actor=Optional[float], cpus_per_actor=Optional[float],
                      memory_per_actor_gb=Optional[float], rows_per_shard=Optional[int], jpeg_quality=Optional[int],
                      limit=Optional[int], compile=Optional[bool], compile_cache=Optional[str])


def with_generate_options(fn):
    """Give `fn` the shared generate options (typer reads the signature) before its own."""
    import inspect

    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=GENERATE_TYPES[name])
              for name, opt in GENERATE_OPTIONS.items()]
    fn.__signature__ = inspect.Signature(shared + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own])
    return fn


def _split_generate_kwargs(kwargs: dict) -> tuple[dict, dict]:
    shared = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATE_OPTIONS}
    return shared, kwargs


@app.command()
@with_generate_options
@friendly
def generate(overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
             **kwargs):
    """Translate train images toward other classes on a Ray actor pool; write Parquet+JPEG shards."""
    from .generate.run import run_generate

    shared, _ = _split_generate_kwargs(kwargs)
    run_generate(_generate_config(**shared), overwrite=overwrite)


@app.command()
@with_generate_options
@friendly
def plan(images_per_second: Optional[float] = typer.Option(
             None, help="Measured throughput of ONE actor, for the time/GPU-hour estimate."),
         calibrate: Optional[int] = typer.Option(
             None, help="Measure throughput by translating N pairs on this machine first."),
         **kwargs):
    """Dry run: pairs per mode/class, shards, bytes, and a wall-time / GPU-hour estimate. Writes nothing."""
    from .generate.estimate import estimate

    shared, _ = _split_generate_kwargs(kwargs)
    estimate(_generate_config(**shared), images_per_second=images_per_second, calibrate=calibrate)


@app.command("train-cls")
@friendly
def train_cls(
    dataset: Optional[str] = typer.Option(None, help="Canonical dataset URI."),
    synthetic: Optional[list[str]] = typer.Option(None, help="Synthetic shards URI (from generate); repeatable."),
    arch: Optional[str] = typer.Option(None, help="timm architecture, e.g. resnet50, vit_base_patch16_384."),
    out: Optional[str] = typer.Option(None, help="Output URI: metrics.json, best/, checkpoints under train/."),
    config: Optional[str] = typer.Option(None, help="YAML file with any of these options."),
    pretrained: Optional[str] = typer.Option(None, help="Local weights file/folder for --arch (no hub access)."),
    augment: Optional[str] = typer.Option(None, help="Image pipeline: timm (default; the architecture's) | reference "
                                          "(Diff-Mix: Resize((r,r)) > RandomCrop(c, pad 8) > flip) | reference-lt "
                                          "(its long-tail trainer: RandomResizedCrop > flip > ColorJitter 0.4)."),
    res_mode: Optional[int] = typer.Option(None, help="reference pipelines: 224 | 384 | 448 = resize>crop 256>224, "
                                           "440>384, 512>448 (default 224)."),
    img_size: Optional[int] = typer.Option(None, help="--augment timm: input size (default: the architecture's)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 30)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per worker (default 32)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 0.05)."),
    lr_scaling: Optional[str] = typer.Option(None, help="none (default) | linear: lr x global batch / --lr-base-batch."),
    lr_base_batch: Optional[int] = typer.Option(None, help="Global batch --lr is given for under linear scaling "
                                                "(default 256)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd (default) | adamw."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default 5e-4)."),
    schedule: Optional[str] = typer.Option(None, help="cosine (default; to 0 over all steps) | step (x--lr-decay at "
                                           "each --lr-milestones epoch; the long-tail trainer's)."),
    warmup_fraction: Optional[float] = typer.Option(None, help="Linear warm-up over this share of all steps "
                                                    "(default 0.1 with cosine, the reference's)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warm-up in epochs instead (default 5 with step)."),
    lr_milestones: Optional[str] = typer.Option(None, help="step: epochs where the lr is multiplied by --lr-decay "
                                                "(default 80%,90% of --epochs: 160,180 of 200)."),
    lr_decay: Optional[float] = typer.Option(None, help="step: factor per milestone (default 0.01)."),
    loss: Optional[str] = typer.Option(None, help="ce (default) | drw (class re-weighting from --drw-epoch) | "
                                       "balanced-softmax | ldam | ldam-drw (LDAM margins, + drw)."),
    drw_epoch: Optional[int] = typer.Option(None, help="drw: first re-weighted epoch (default 80% of --epochs: 160 "
                                            "of 200)."),
    drw_beta: Optional[float] = typer.Option(None, help="drw: effective-number beta (default 0.9999)."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing on the soft target (default 0.1)."),
    select: Optional[str] = typer.Option(None, help="val (default): report the epoch with the best val top-1 | last: "
                                         "the final epoch (datasets without val; published-number protocol)."),
    shot_thresholds: Optional[str] = typer.Option(None, help="MANY,FEW for many/medium/few (default: the dataset's, "
                                                  "from dataset.json)."),
    synthetic_p: Optional[float] = typer.Option(None, help="P(replace a real sample by a synthetic one); default 0.1, 0.3 for few-shot/long-tail."),
    synthetic_sampling: Optional[str] = typer.Option(None, help="uniform | inverse-frequency (by target class ∝ "
                                                     "1/(n_c+1)); default inverse-frequency on long-tailed datasets."),
    synthetic_pick: Optional[str] = typer.Option(None, help="pool (default; Diff-Mix: any synthetic image, drawn "
                                                 "by --synthetic-sampling) | own-source (DA-Fusion: one of the real "
                                                 "image's own translations)."),
    gamma: Optional[float] = typer.Option(None, help="Soft-label exponent: y = (1-s^g) src + s^g tgt (default 0.5)."),
    synthetic_filter: Optional[list[str]] = typer.Option(None, help="Keep synthetic images whose scores pass every "
                                                         "condition: COLUMN>=VALUE (>, <=, <), COLUMN:pA-B (percentile "
                                                         "band, e.g. clip_object_prob:p10-100), COLUMN:pA-B@class (per "
                                                         "target class); repeatable or comma-separated."),
    scores: Optional[list[str]] = typer.Option(None, help="The scores a filter reads: <synthetic>/scores/NAME (default "
                                               "'default'); once for all --synthetic, or once each."),
    allow_incomplete: Optional[bool] = typer.Option(None, "--allow-incomplete", help="Accept shards (and scores) "
                                                    "without _SUCCESS."),
    cutmix: Optional[bool] = typer.Option(None, "--cutmix", help="CutMix baseline (with --synthetic: needs "
                                          "--mixing reference)."),
    mixup: Optional[bool] = typer.Option(None, "--mixup", help="Mixup baseline (with --synthetic: needs "
                                         "--mixing reference)."),
    mixing: Optional[str] = typer.Option(None, help="timm (default; batch mode, real data only) | reference (the "
                                         "Diff-Mix code's: CutMix per sample on the rows' own, soft, labels)."),
    mix_prob: Optional[float] = typer.Option(None, help="Probability of --cutmix/--mixup (default 0.5; reference "
                                             "CutMix: per sample)."),
    cmo: Optional[bool] = typer.Option(None, "--cmo", help="CMO long-tail baseline: a box of a minority-sampled "
                                       "image (1/n_c) pasted in, p 0.5 per batch."),
    soft_scaler: Optional[float] = typer.Option(None, help="Synthetic targets x this (default 1.0; the reference's "
                                                "dataset classes use 0.9)."),
    drop_last: Optional[bool] = typer.Option(None, "--drop-last/--no-drop-last", help="Drop each epoch's "
                                             "incomplete last batch (default) or train on it (the long-tail trainer)."),
    seed: Optional[int] = typer.Option(None, help="Seed (default 2020)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds: one run each, then mean ± std."),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers (DDP)."),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per worker (default 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per worker. Default: 1 when the Ray cluster has GPUs or its autoscaler can add them, else 0 (CPU)."),
    gpu_decode: Optional[bool] = typer.Option(None, "--gpu-decode", help="Decode JPEGs (nvJPEG) and augment on "
                                              "each worker's GPU instead of CPU data workers: for nodes with few "
                                              "CPU cores per GPU. GPU workers only."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Epochs between full checkpoints (default 10; one is "
                                                   "always written after the last epoch). A resumed run restarts "
                                                   "from the last one."),
    test_every_epoch: Optional[bool] = typer.Option(None, "--test-every-epoch", help="Score test every epoch (for "
                                                    "curves) instead of once, on the selected weights."),
    resume: bool = typer.Option(False, help="Continue an unfinished run of the same config from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
):
    """Train a timm classifier on real data plus synthetic shards (Ray Train, DDP)."""
    from . import config as cfgmod
    from .classify.config import ClassifyConfig
    from .classify.run import run_classify, run_seeds

    cfg = cfgmod.build(ClassifyConfig, config, dict(
        dataset=dataset, synthetic=tuple(synthetic) if synthetic else None, arch=arch, out=out,
        pretrained=pretrained, augment=augment, res_mode=res_mode, img_size=img_size, epochs=epochs,
        batch_size=batch_size, lr=lr, lr_scaling=lr_scaling, lr_base_batch=lr_base_batch, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs,
        lr_milestones=lr_milestones, lr_decay=lr_decay, loss=loss, drw_epoch=drw_epoch, drw_beta=drw_beta,
        label_smoothing=label_smoothing, select=select, shot_thresholds=shot_thresholds, synthetic_p=synthetic_p,
        synthetic_sampling=synthetic_sampling, synthetic_pick=synthetic_pick, gamma=gamma,
        synthetic_filter=tuple(synthetic_filter) if synthetic_filter else None, scores=tuple(scores) if scores else None,
        allow_incomplete=allow_incomplete, cutmix=cutmix, mixup=mixup, mixing=mixing, mix_prob=mix_prob, cmo=cmo,
        soft_scaler=soft_scaler, drop_last=drop_last, seed=seed, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, gpu_decode=gpu_decode,
        checkpoint_every=checkpoint_every, test_every_epoch=test_every_epoch))
    if seeds is not None:
        run_seeds(cfg, _ints(seeds, "--seeds"), overwrite=overwrite, resume=resume)
    else:
        run_classify(cfg, overwrite=overwrite, resume=resume)


@app.command()
@friendly
def score(
    synthetic: Optional[str] = typer.Option(None, help="A generate output (local path or s3://) whose shards to score."),
    clip: Optional[str] = typer.Option(None, help="CLIP model: sample (trained on the sample world) | tiny | clip-b32 "
                                       "(random weights, for tests and benchmarks) | a CLIPModel folder | s3://... | "
                                       "a hub id org/name (only when online)."),
    classifier: Optional[str] = typer.Option(None, help="A finished train-cls run: adds its softmax probability of the "
                                             "source and the target class."),
    name: Optional[str] = typer.Option(None, help="Scores go to <synthetic>/scores/NAME/ (default 'default')."),
    dataset: Optional[str] = typer.Option(None, help="The canonical dataset the shards were made from (default: the "
                                          "one generate recorded; its fingerprint must match)."),
    allow_incomplete: Optional[bool] = typer.Option(None, "--allow-incomplete", help="Score shards without _SUCCESS."),
    batch_size: Optional[int] = typer.Option(None, help="Images per scoring call (default 64)."),
    min_actors: Optional[int] = typer.Option(None, help="Scoring actors, autoscaling minimum (default 1)."),
    max_actors: Optional[int] = typer.Option(None, help="Scoring actors, autoscaling maximum (default 1)."),
    gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per actor. Default: 1 when the Ray cluster has GPUs "
                                                   "or its autoscaler can add them, else 0 (CPU, fp32)."),
    cpus_per_actor: Optional[float] = typer.Option(None, help="CPUs per actor; on CPU also its torch threads (default 1)."),
    memory_per_actor_gb: Optional[float] = typer.Option(None, help="Host memory reserved per actor."),
    rows_per_file: Optional[int] = typer.Option(None, help="Scores per Parquet file (default 100000)."),
    config: Optional[str] = typer.Option(None, help="YAML file with any of these options."),
    overwrite: bool = typer.Option(False, help="Delete a different scores run found under this name and start again."),
):
    """Score synthetic images (CLIP, source similarity, a classifier) on a Ray actor pool, beside the shards."""
    from . import config as cfgmod
    from .score.config import ScoreConfig
    from .score.run import run_score

    cfg = cfgmod.build(ScoreConfig, config, dict(
        synthetic=synthetic, clip=clip, classifier=classifier, name=name, dataset=dataset,
        allow_incomplete=allow_incomplete, batch_size=batch_size, min_actors=min_actors, max_actors=max_actors,
        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, memory_per_actor_gb=memory_per_actor_gb,
        rows_per_file=rows_per_file))
    run_score(cfg, overwrite=overwrite)


@app.command()
@friendly
def evaluate(checkpoint: str = typer.Option(..., help="A train-cls output directory (or its best/ folder)."),
             dataset: str = typer.Option(..., help="Canonical dataset URI to score on."),
             split: str = typer.Option("test", help="train | val | test.")):
    """Re-score a trained classifier's selected weights (its best/: by val, or the last epoch) on a dataset split."""
    import json

    from .classify.evaluate import evaluate as run_evaluate

    result = run_evaluate(checkpoint, dataset, split)
    console.print(f"{split} top-1 {result['top1']:.4f} on {result['images']} images (epoch {result['selected_epoch']})")
    print(json.dumps(result))


@app.command()
@friendly
def report(runs: list[str] = typer.Argument(..., help="generate outputs and/or train-cls runs."),
           out: Optional[str] = typer.Option(None, help="Folder for the report (default: report/ next to the first run)."),
           gamma: float = typer.Option(0.5, help="Soft-label exponent used to label the contact sheet.")):
    """Contact sheets of synthetic images, accuracy plots and a comparison table (Markdown + HTML)."""
    from .config import check_finite
    from .orchestrate.report import run_report

    check_finite({"--gamma": gamma})
    written = run_report(runs, out, gamma=gamma)
    for kind, paths in written.items():
        for p in paths:
            console.print(f"{kind}: {p}")


@model_app.command("make-tiny", help="The old name of `model make` (same options; default preset tiny).")
@model_app.command("make")
@friendly
def make_model(out: str = typer.Argument(..., help="Directory (or s3:// URI) to write the diffusers folder into."),
               preset: str = typer.Option("tiny", help="tiny (tests), bench (CPU benchmarks), sd15 (SD 1.5's "
                                          "exact architecture: GPU benchmarks; ~4 GB RAM to build), or sample (the "
                                          "shipped model trained on the sample world, copied)."),
               seed: int = typer.Option(0, help="Weight seed: same preset and seed, same weights."),
               dtype: Optional[str] = typer.Option(None, help="float32 | float16 weights on disk (default: float16 "
                                                   "for sd15: half the disk, and what a GPU runs; float32 for "
                                                   "tiny/bench)."),
               overwrite: bool = typer.Option(False, help="Replace a non-empty OUT.")):
    """Write a built-in, randomly initialised SD-shaped model as a normal diffusers folder (local or s3://).
    Its images are noise: it is for tests, benchmarks and calibration, not for results."""
    from .models.loader import write_model
    from .models.presets import preset_config, resolve_write_dtype

    if preset == "sample":  # the trained sample model: its shipped folder, copied as it is
        console.print(f"wrote the 'sample' model to {write_model('sample', out, overwrite=overwrite, dtype=dtype)}")
        return
    preset_config(preset)  # an unknown name fails here, listing the presets, before any work
    dtype = resolve_write_dtype(preset, dtype)
    written = write_model(f"{preset}:{seed}", out, overwrite=overwrite, dtype=dtype)
    console.print(f"wrote the '{preset}' model (seed {seed}, {dtype}) to {written}")


@model_app.command("make-clip")
@friendly
def make_clip(out: str = typer.Argument(..., help="Directory (or s3:// URI) to write the CLIPModel folder into."),
              preset: str = typer.Option("tiny", help="tiny (tests), clip-b32 (CLIP ViT-B/32's exact "
                                         "architecture: GPU benchmarks) or sample (the shipped CLIP trained on the "
                                         "sample world, copied)."),
              seed: int = typer.Option(0, help="Weight seed: same preset and seed, same weights."),
              overwrite: bool = typer.Option(False, help="Replace a non-empty OUT.")):
    """Write a built-in, randomly initialised CLIP model as a normal CLIPModel folder (config, weights, tokenizer,
    preprocessor config), loadable by `score --clip OUT` and by transformers. Its scores mean nothing."""
    from .models.clip import CLIP_PRESETS, write_clip

    if preset == "sample":  # the trained sample CLIP: its shipped folder, copied as it is
        console.print(f"wrote the 'sample' CLIP model to {write_clip('sample', out, overwrite)}")
        return
    if preset not in CLIP_PRESETS:
        raise DiffmixError(f"unknown CLIP preset {preset!r}; choose one of {', '.join(CLIP_PRESETS)}")
    console.print(f"wrote the '{preset}' CLIP model (seed {seed}) to {write_clip(f'{preset}:{seed}', out, overwrite)}")


@model_app.command("train-sample")
@friendly
def train_sample(out: str = typer.Argument(..., help="Local folder to write sd/ (the `sample` model) and clip/ into."),
                 seed: int = typer.Option(0, help="Seed of the drawn images and every weight: same seed, threads and "
                                          "library versions give the same files."),
                 vae_steps: Optional[int] = typer.Option(None, help="VAE steps (default: what the shipped model used)."),
                 unet_steps: Optional[int] = typer.Option(None, help="UNet + text-encoder steps (default: as shipped)."),
                 clip_steps: Optional[int] = typer.Option(None, help="CLIP steps (default: as shipped)."),
                 images_per_class: Optional[int] = typer.Option(None, help="Training images drawn per class."),
                 threads: Optional[int] = typer.Option(None, help="torch threads (part of what fixes the result)."),
                 overwrite: bool = typer.Option(False, help="Replace a non-empty OUT.")):
    """Train the `sample` model (SD-shaped: VAE, UNet, CLIP text encoder + tokenizer, SD 1.5's scheduler) and the
    sample CLIP from scratch on the sample world, on this machine's CPU, and write them as an SD folder (OUT/sd) and
    a CLIPModel folder (OUT/clip), each with its training record. Use them with --model OUT/sd --clip OUT/clip."""
    import dataclasses

    from .models.sample_train import TrainSampleConfig, train_sample as train

    given = dict(vae_steps=vae_steps, unet_steps=unet_steps, clip_steps=clip_steps,
                 images_per_class=images_per_class, threads=threads)
    cfg = dataclasses.replace(TrainSampleConfig(seed=seed), **{k: v for k, v in given.items() if v is not None})
    train(out, cfg, command=" ".join(["diffmix-ray", "model", "train-sample"] + sys.argv[3:]), overwrite=overwrite)


@model_app.command("convert-classifier")
@friendly
def convert_classifier(src: str = typer.Argument(..., help="A torchvision state dict (.pth), e.g. "
                                                 "resnet50-0676ba61.pth or vit_b_16_swag-9ac1b537.pth from "
                                                 "~/.cache/torch/hub/checkpoints."),
                       out: str = typer.Argument(..., help="OUT.safetensors, or a folder that receives "
                                                 "model.safetensors: what --pretrained then reads."),
                       arch: str = typer.Option(..., help="timm architecture to map onto: resnet50 | "
                                                "vit_base_patch16_384 | vit_base_patch16_224."),
                       overwrite: bool = typer.Option(False, help="Replace an existing OUT file.")):
    """Rename torchvision classifier weights (the Diff-Mix reference's ResNet-50 IMAGENET1K_V1 and ViT-B/16
    IMAGENET1K_SWAG_E2E_V1) onto a timm architecture, every tensor checked, for `--pretrained`."""
    from .classify.convert import convert_file
    from .classify.model import fingerprint

    file = convert_file(src, out, arch, overwrite)
    console.print(f"wrote {file} ({arch}; sha256 {fingerprint(file)[:12]}): pass it as --pretrained", highlight=False)


@model_app.command("stage")
@friendly
def stage(uri: str = typer.Argument(..., help="s3:// URI of a diffusers model folder."),
          all_nodes: bool = typer.Option(False, "--all-nodes", help="Stage on every alive node of the Ray "
                                         "cluster (RAY_ADDRESS), one pinned task per node.")):
    """Copy a model folder from S3 into this node's cache once (later loads reuse it)."""
    if not all_nodes:
        from .models.loader import stage_model

        console.print(stage_model(uri))
        return
    import json

    from .runtime.stage import stage_on_all_nodes

    for row in stage_on_all_nodes(uri):
        console.print(f"{row['host']} ({row['node_id'][:12]}): {row['path'] or row.get('skipped')}")
        print(json.dumps(row))


@app.command()
@friendly
def demo(out: str = typer.Option("demo-out", help="Local folder for every stage's output."),
         overwrite: bool = typer.Option(False, help="Start again even if --out holds a finished demo.")):
    """Run the pipeline on built-in defaults: the sample world, the sample model and CLIP, local disk, CPU."""
    from .orchestrate.demo import run_demo

    run_demo(out, overwrite=overwrite)


def _ints(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise DiffmixError(f"{flag} {text!r} must be whole numbers separated by commas, e.g. 2020,2021,2022") from None
    if repeated := sorted({v for v in values if values.count(v) > 1}):
        raise DiffmixError(f"{flag} {text!r} lists {repeated[0]} twice: each run would be trained once and counted "
                           "twice in the mean ± std; list each value once")
    return values


@app.command("run")
@friendly
def run_cmd(recipe: str = typer.Argument(..., help="A recipe name (`diffmix-ray recipe list`) or a recipe YAML file."),
            out: str = typer.Option(..., help="Output URI: every stage's output, the report, timings.json."),
            data: Optional[str] = typer.Option(None, help="The raw dataset the recipe prepares (its layout: "
                                               "`diffmix-ray recipe show NAME`); builtin:sample[:CxN] for the sample world."),
            model: Optional[str] = typer.Option(None, help="Base diffusion model: a diffusers folder or s3:// URI "
                                                "(SD 1.5 for the paper); sample (trained on the sample world) | tiny | bench | sd15."),
            seeds: Optional[str] = typer.Option(None, help="Classifier seeds, comma-separated (default: the recipe's)."),
            methods: Optional[str] = typer.Option(None, help="Methods to run, comma-separated (default: the table's "
                                                  "rows)."),
            pretrained: Optional[str] = typer.Option(None, help="Local weights for the classifier architecture "
                                                     "(`recipe show` says which; `none`: from scratch, on purpose)."),
            clip: Optional[str] = typer.Option(None, help="CLIP model for the methods that filter synthetic images "
                                               "(Real-Filtering): a CLIPModel folder or s3:// URI (ViT-B/32 for the "
                                               "paper); sample | tiny for CPU runs (default: the recipe's)."),
            overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again.")):
    """A table column of the paper as one resumable command: prepare -> finetune -> generate -> score (filtering
    methods) -> train-cls for every method x seed -> report (mean ± std per method). Rerun to resume."""
    from .orchestrate.recipes import load
    from .orchestrate.run import run_recipe

    run_recipe(load(recipe), out, data=data, model=model, seeds=_ints(seeds, "--seeds"),
               methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
               pretrained=pretrained, overwrite=overwrite, clip=clip)


@recipe_app.command("list")
@friendly
def recipe_list():
    """Every recipe: its name, the table it reproduces and its methods."""
    from rich.table import Table

    from .orchestrate.recipe_files import recipe_dirs
    from .orchestrate.recipes import catalogue

    table = Table(title="recipes (" + ", ".join(str(d) for d in recipe_dirs()) + ")")
    for col in ("name", "reproduces", "--data", "rows"):
        table.add_column(col, overflow="fold")
    for name, raw, _ in catalogue():
        table.add_row(name, raw.get("table", ""), (raw.get("prepare") or {}).get("format", "?"),
                      str(len(raw.get("rows") or [])))
    console.print(table)
    console.print("`diffmix-ray recipe show NAME`: a recipe in full (its methods, stages and what --data holds)")


@recipe_app.command("show")
@friendly
def recipe_show(name: str = typer.Argument(..., help="A recipe name or file.")):
    """A recipe in full, after its base file and matrix are merged in, validated."""
    import yaml

    from .orchestrate.recipes import load

    r = load(name)
    for line in (f"{r.name} ({r.file})", r.table, f"--data: {r.data_layout}"):
        console.print(f"# {line}", highlight=False, markup=False)
    if r.description:
        console.print("# " + " ".join(r.description.split()), highlight=False, markup=False)
    for line in r.summary():
        console.print(f"# {line}", highlight=False, markup=False)
    print(yaml.safe_dump(r.content, sort_keys=False, allow_unicode=True, width=110), end="")


from .finetune.command import finetune as _finetune  # noqa: E402
app.command(name="finetune")(friendly(_finetune))


from .runtime.jobs import register_job_commands  # noqa: E402
register_job_commands(app, friendly)


def main() -> None:  # pragma: no cover - `python -m diffmix_ray`
    app(prog_name="diffmix-ray")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
