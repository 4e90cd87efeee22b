"""The `diffmix-ray` command line: one thin command per stage, no logic beyond parsing and calling. A stage's
options are its config's fields (config.option), turned into typer options by cli_config.config_command."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer
from rich.markup import escape

from .classify.config import ClassifyConfig
from .cli_config import config_command
from .config import cli_fields, flag
from .console import console, setup_logging
from .data.derive import DeriveConfig
from .data.prepare import PrepareConfig
from .errors import DiffmixError
from .finetune.config import FinetuneConfig
from .generate.config import GenerateConfig
from .runtime.jobs import DEFAULT_ADDRESS
from .score.config import ScoreConfig

FLAGS_OVERRIDE = "YAML file with any of these options (flags override it)."

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


def _prepare_or_derive(given: dict) -> type:
    """--from derives a subset of a canonical dataset (DeriveConfig); otherwise a raw source is read
    (PrepareConfig). The options only the other one has are refused, naming them."""
    raw, derived = cli_fields(PrepareConfig), cli_fields(DeriveConfig)
    only_raw = [f for f in raw if f.name not in {d.name for d in derived}]
    only_derived = [f for f in derived if f.name not in {r.name for r in raw} and f.name != "parent"]
    if given["parent"] is not None:
        if named := [flag(f) for f in only_raw if given[f.name] is not None]:
            raise DiffmixError(f"--from derives from a canonical dataset, whose splits and images are fixed; "
                               f"{', '.join(named)} only apply when reading a raw source: drop them")
        return DeriveConfig
    if any(given[f.name] is not None for f in only_derived):
        raise DiffmixError(f"{'/'.join(flag(f) for f in only_derived)} derive a subset of a canonical dataset: "
                           "prepare the full dataset first, then pass --from URI")
    return PrepareConfig


@app.command()
@friendly
@config_command((PrepareConfig, DeriveConfig), pick=_prepare_or_derive)
def prepare(out: str = typer.Option(..., help="Output URI (local path or s3://bucket/prefix) of the canonical "
                                    "dataset."),
            cfg: PrepareConfig | DeriveConfig = None,
            overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
            quiet: bool = typer.Option(False, help="No progress bar.")):
    """Read a raw dataset (or a canonical one, with --from) and write the canonical dataset."""
    from .data import prepare as prep

    if isinstance(cfg, DeriveConfig):
        info = prep.derive(cfg, out, overwrite=overwrite)
    else:
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


@app.command()
@friendly
@config_command(GenerateConfig, place={"config": "out"}, config_help=FLAGS_OVERRIDE)
def generate(cfg: GenerateConfig,
             overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again.")):
    """Translate train images toward other classes on a Ray actor pool; write Parquet+JPEG shards."""
    from .generate.run import run_generate

    run_generate(cfg, overwrite=overwrite)


@app.command()
@friendly
@config_command(GenerateConfig, place={"config": "out"}, config_help=FLAGS_OVERRIDE)
def plan(cfg: GenerateConfig,
         images_per_second: Optional[float] = typer.Option(
             None, help="Measured throughput of ONE actor, for the time/GPU-hour estimate."),
         calibrate: Optional[int] = typer.Option(
             None, help="Measure throughput by translating N pairs on this machine first.")):
    """Dry run: pairs per mode/class, shards, bytes, and a wall-time / GPU-hour estimate. Writes nothing."""
    from .generate.estimate import estimate

    estimate(cfg, images_per_second=images_per_second, calibrate=calibrate)


@app.command("train-cls")
@friendly
@config_command(ClassifyConfig, place={"config": "out", "seeds": "seed"})
def train_cls(cfg: ClassifyConfig,
              seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds: one run each, then mean ± std."),
              resume: bool = typer.Option(False, help="Continue an unfinished run of the same config from its last "
                                          "checkpoint."),
              overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again.")):
    """Train a timm classifier on real data plus synthetic shards (Ray Train, DDP)."""
    from .classify.run import run_classify, run_seeds

    if seeds is not None:
        run_seeds(cfg, _ints(seeds, "--seeds"), overwrite=overwrite, resume=resume)
    else:
        run_classify(cfg, overwrite=overwrite, resume=resume)


@app.command()
@friendly
@config_command(ScoreConfig)
def score(cfg: ScoreConfig,
          overwrite: bool = typer.Option(False, help="Delete a different scores run found under this name and start "
                                         "again.")):
    """Score synthetic images (CLIP, source similarity, a classifier) on a Ray actor pool, beside the shards."""
    from .score.run import run_score

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


@app.command()
@friendly
@config_command(FinetuneConfig, place={"config": "out"}, config_help=FLAGS_OVERRIDE)
def finetune(cfg: FinetuneConfig,
             overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
             resume: bool = typer.Option(False, help="Insist on resuming the run at --out (fail if it holds none).")):
    """Learn one token per class plus a UNet LoRA (Ray Train, DDP) and write the concept bank `generate` uses."""
    from .finetune.run import run_finetune

    run_finetune(cfg, overwrite=overwrite, resume=resume)


# Ray job helpers over the job-submission REST API (runtime/jobs.py does the work).
ADDRESS_HELP = (f"Dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_ADDRESS}). Token auth: "
                "export RAY_AUTH_TOKEN.")


@app.command("status")
@friendly
def status_cmd(submission_id: Optional[str] = typer.Argument(None, help="A job's submission id; omit for a table of "
                                                             "recent jobs."),
               address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
               json_: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
               wait: bool = typer.Option(False, help="Block until the job ends; exit 0 only if it SUCCEEDED.")):
    """Status of one Ray job (or the recent ones) on the cluster."""
    from .runtime import jobs

    if wait:
        if not submission_id:
            raise DiffmixError("--wait needs a SUBMISSION_ID")
        final = jobs.wait_for(submission_id, address)
        console.print(f"{submission_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)
        return
    jobs.show_status(submission_id, address, json_)


@app.command("logs")
@friendly
def logs_cmd(submission_id: str = typer.Argument(..., help="The job's submission id."),
             address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
             follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends.")):
    """Print a Ray job's driver logs (stdout+stderr)."""
    from .runtime import jobs

    jobs.print_logs(submission_id, address, follow)


@app.command("stop")
@friendly
def stop_cmd(submission_id: str = typer.Argument(..., help="The job's submission id."),
             address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """Ask a running Ray job to stop (its output stays resumable: rerun the same command)."""
    from .runtime import jobs

    if jobs.stop(submission_id, address):
        console.print(f"stop requested for {submission_id}")
    else:
        console.print(f"{submission_id} was not running; nothing to stop")


def main() -> None:  # pragma: no cover - `python -m diffmix_ray`
    app(prog_name="diffmix-ray")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
