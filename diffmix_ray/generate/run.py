"""`generate` as an actor-pool stage (runtime/pool_stage.py runs it): its inputs (dataset, model,
concept bank), its plan (one row per pair, kept in <out>/plan/), where each pair's source image is,
its steps (read + decode + resize -> translation actor -> resize + JPEG) and its manifest.

Exactly-once (diffmix_ray/exactly_once.py, through the driver): shard files are appended into
<out>/shards/. A rerun reads the pair_ids of the shards that exist (an unreadable file, e.g. cut
short by a killed driver, is deleted: its pairs are simply redone), generates only the missing
pairs, then verifies that the shard set equals the plan; duplicates (a pair in two files) are
compacted away before _SUCCESS."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import pyarrow as pa

from .. import canonical, config, exactly_once, storage
from ..console import console, logger
from ..contracts import (COL_IMAGE_ID, COL_LABEL, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL,
                         PLAN_DIR, SHARD_SCHEMA, SHARDS_DIR)
from ..errors import DiffmixError
from ..models import concepts as bank_io
from ..models.loader import resolve_model
from ..runtime.pool_stage import Outcome, PoolStage, Step, Steps, print_resolved, run_pool_stage
from ..synthetic import damaged_shards, describe_damage, shard_records
from .config import GenerateConfig
from .cpu_stages import COL_FILE, COL_ROW, finish_images, prepare_sources  # no torch in their workers
from .plan import denoising_steps, make_plan
from .translate import Translator

PLAN_FILE = "plan-00000.parquet"
VERSIONED = ("diffmix-ray", "ray", "torch", "diffusers", "transformers", "peft", "pyarrow")


@dataclasses.dataclass
class Inputs:
    """Everything the driver resolved before doing any work."""

    cfg: GenerateConfig
    out: str
    dataset: canonical.Dataset
    model_fingerprint: str
    bank: bank_io.ConceptBank | None
    identity: dict
    resolution: int  # the model's image side in pixels
    resolved: dict = dataclasses.field(default_factory=dict)  # option -> {"value", "from"}, for the manifest
    model_location: str | None = None  # where the model's weights are read (None: a preset)

    def print_resolved(self) -> None:
        print_resolved(self.resolved)


def _normalized(identity: dict) -> dict:
    """YAML and Python give `multiplier: 5` where the CLI gives 5.0; the same run must hash the
    same however it was configured, so numbers are floats wherever the option is a float."""
    out = dict(identity)
    for key in ("multiplier", "strength", "guidance"):
        if out.get(key) is not None:
            out[key] = float(out[key])
    for key in ("strength_set", "strength_beta"):
        if out.get(key) is not None:
            out[key] = [float(v) for v in out[key]]
    return out


def resolve_sampling(cfg: GenerateConfig, info) -> tuple[GenerateConfig, dict]:
    """The sampling options left to the dataset, resolved into the config (so spelling out a default
    is the same run), with where each value came from."""
    long_tail = info.subset.get("kind") == "long-tail"
    counts = info.class_counts("train")
    if cfg.source_sampling is not None:
        source, source_from = cfg.source_sampling, "--source-sampling"
    elif long_tail:
        source, source_from = "per-image", (
            f"default for long-tailed datasets (imbalance ratio {info.subset.get('imbalance_ratio'):g}): sources "
            "follow the long-tailed image distribution, as the paper's long-tail generation draws them; "
            "--source-sampling class-uniform to change")
    else:
        source, source_from = "class-uniform", "default (the reference's: a class uniformly, then one of its images)"
    if cfg.per_image is not None or cfg.kind == "gen":
        source_from += "; unused: " + ("--per-image sets the sources" if cfg.per_image is not None
                                       else f"--mode {cfg.mode} generates from text")
    target_from = "--target-sampling" if cfg.target_sampling != "uniform" else "default (the reference's)"
    if long_tail and cfg.target_sampling == "uniform" and cfg.kind != "aug":
        target_from += ("; train-cls draws synthetic images by target class ∝ 1/(n_c + 1) on long-tailed "
                        "data, the paper's weighting")
    if cfg.target_sampling == "inverse-frequency" and counts and min(counts) == max(counts):
        logger.warning("--target-sampling inverse-frequency on %s, whose classes all have %d train images: the "
                       "weights 1/(n_c + 1) are equal, so targets are drawn uniformly; it is meant for long-tailed "
                       "datasets", info.name, counts[0])
    resolved = {"source_sampling": {"value": source, "from": source_from},
                "target_sampling": {"value": cfg.target_sampling, "from": target_from}}
    return dataclasses.replace(cfg, source_sampling=source), resolved


def resolve_inputs(cfg: GenerateConfig) -> Inputs:
    """Validate the config and every input (dataset, model, bank) before any output is touched."""
    cfg.validate()
    out = storage.normalize(cfg.out) if cfg.out else ""  # `plan` needs no output
    dataset = canonical.open_dataset(cfg.dataset)
    if dataset.info.split_size("train") == 0:
        raise DiffmixError(f"the train split of {cfg.dataset} is empty: nothing to translate")
    cfg, resolved = resolve_sampling(cfg, dataset.info)
    model = resolve_model(cfg.model)
    bank = None
    if cfg.concepts:
        bank, _ = bank_io.load_bank(cfg.concepts)
        bank_io.check_bank_matches(bank, cfg.concepts, model.fingerprint, dataset.info.fingerprint)
        if len(bank.tokens) != dataset.info.num_classes:
            raise DiffmixError(f"concept bank {cfg.concepts} has tokens for {len(bank.tokens)} classes but the "
                               f"dataset has {dataset.info.num_classes}: some target classes have no token")
        if cfg.mode == "da-fusion" and bank.mode != "ti":
            raise DiffmixError(f"--mode da-fusion uses a TI-only bank; {cfg.concepts} is a {bank.mode} bank")
    identity = _normalized(config.identity(cfg)) | {
        "dataset": dataset.uri, "dataset_fingerprint": dataset.info.fingerprint,
        "model_fingerprint": model.fingerprint, "concepts_fingerprint": bank.fingerprint if bank else None}
    return Inputs(cfg, out, dataset, model.fingerprint, bank, identity, model.resolution, resolved, model.location)


def build_plan(inputs: Inputs) -> pa.Table:
    # Leakage guard: only the train split's files are opened; val/test never reach generation.
    train = inputs.dataset.read_split("train", columns=[COL_IMAGE_ID, COL_LABEL])
    return make_plan(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_LABEL).to_pylist(),
                     inputs.dataset.info.num_classes, inputs.cfg)


def write_plan(out: str, plan: pa.Table) -> None:
    uri = storage.join(out, PLAN_DIR, PLAN_FILE)
    if storage.exists(uri):
        existing = storage.read_parquet(uri)
        if existing.equals(plan):
            return
        logger.warning("the stored plan differs from the recomputed one; replacing it")
    storage.makedirs(storage.join(out, PLAN_DIR))
    exactly_once.write_table_atomic(uri, plan)


class GenerateStage(PoolStage):
    """`generate` as an actor-pool stage: plan rows in, shard rows (JPEG + plan columns) out."""

    name, verb = "generate", "generated"
    file_prefix, file_word, row_words, missing_words = "shard", "shard(s)", "pairs", "pairs are missing"
    schema = SHARD_SCHEMA
    versioned = VERSIONED

    def __init__(self, inputs: Inputs) -> None:
        cfg = inputs.cfg
        super().__init__(cfg, inputs.out, storage.join(inputs.out, SHARDS_DIR), inputs.identity, cfg.rows_per_shard,
                         cfg.rows_per_shard, inputs.resolved)
        self.inputs = inputs

    def input_uris(self) -> storage.Inputs:
        i = self.inputs
        return {"--dataset": i.dataset.uri, "--model": i.model_location, "--concepts": i.cfg.concepts}

    def shared_inputs(self) -> list[tuple[str, str | None]]:
        cfg = self.cfg
        return [("--dataset", cfg.dataset), ("--model", cfg.model), ("--concepts", cfg.concepts)]

    def make_plan(self) -> pa.Table:
        return build_plan(self.inputs)

    def keep_plan(self, plan: pa.Table) -> None:
        write_plan(self.out, plan)

    def complete(self, manifest: dict) -> str | None:
        if not (damaged := damaged_shards(self.out, manifest)):
            return f"{manifest['counts']['generated']} images"
        console.print(f"{self.out} was complete, but {len(damaged)} shard(s) are damaged: {describe_damage(damaged)}; "
                      "deleting them and generating their pairs again", style="yellow")
        for name in damaged:
            storage.remove_tree(storage.join(self.rows_dir, name))
        return None

    def locate(self, todo: pa.Table) -> pa.Table:
        """Ordered so that a batch runs one number of denoising steps (one pipeline call) and reads
        neighbouring rows of a source file."""
        if self.cfg.kind == "gen":
            return todo.sort_by([(COL_TARGET_LABEL, "ascending")])
        files, rows = self.inputs.dataset.locate("train", todo.column(COL_SOURCE_ID).to_pylist())
        steps = [denoising_steps(s, self.cfg.steps) for s in todo.column(COL_STRENGTH).to_pylist()]
        todo = todo.append_column(COL_FILE, pa.array(files)).append_column(COL_ROW, pa.array(rows))
        todo = todo.append_column("_steps", pa.array(steps, pa.int32()))
        todo = todo.sort_by([("_steps", "ascending"), (COL_FILE, "ascending"), (COL_ROW, "ascending")])
        return todo.drop_columns(["_steps"])

    def row_bytes(self) -> int:
        return self.inputs.resolution ** 2 * 3

    def steps(self, gpus: float, chunk_rows: int) -> Steps:
        cfg, inputs = self.cfg, self.inputs
        info = inputs.dataset.info
        before = None if cfg.kind == "gen" else Step(prepare_sources, {"files": inputs.dataset.files("train"),
                                                                       "resolution": inputs.resolution})
        translator = dict(model=cfg.model, kind=cfg.kind, class_names=info.classes, super_class=info.super_class,
                          concepts=cfg.concepts, steps=cfg.steps, guidance=cfg.guidance,
                          prompt_template=cfg.prompt_template, batch_size=cfg.batch_size, compile=cfg.compile,
                          compile_cache=cfg.compile_cache)
        # The actor takes whole chunks and cuts its own device batches of --batch-size: Ray Data's cost per
        # call (~1 ms: slicing, format conversions) is paid per chunk, and step groups form over the chunk.
        return Steps(before, Translator, translator, chunk_rows, Step(finish_images, {"jpeg_quality": cfg.jpeg_quality}))

    def plan_line(self, plan: pa.Table, done: set[str], todo: pa.Table) -> str:
        return f"plan: {plan.num_rows} pairs ({self.cfg.mode}); already generated {len(done)}; to do {todo.num_rows}"

    def check_rows(self, scan, plan: pa.Table) -> None:
        disagree, example = exactly_once.disagreeing_rows(self.rows_dir, scan.found, plan)
        if disagree:  # another writer's rows (another strength, seed...): never marked complete
            raise DiffmixError(f"{disagree} shard rows disagree with the plan (e.g. {example}): another run wrote "
                               f"into {self.out}; rerun with --overwrite to generate it again from scratch")

    def describe(self, outcome: Outcome) -> dict:
        inputs, after = self.inputs, outcome.after
        return {"dataset_fingerprint": inputs.dataset.info.fingerprint, "model_fingerprint": inputs.model_fingerprint,
                "concepts_fingerprint": inputs.bank.fingerprint if inputs.bank else None,
                "counts": {"planned": outcome.plan.num_rows, "generated": len(after.done),
                           "missing": len(outcome.missing), "failed": len(outcome.failures), "shards": len(after.found),
                           "bytes": outcome.bytes, "pairs": _pair_counts(outcome.plan),
                           "duplicates_removed": outcome.duplicates_removed,
                           "unreadable_shards_removed": outcome.unreadable_removed},
                # rows and bytes per file: a rerun and every reader check the shards by it
                "shard_files": shard_records(after.found, outcome.file_bytes)}

    def summary(self, outcome: Outcome) -> str:
        return (f"{len(outcome.after.done)}/{outcome.plan.num_rows} pairs in {len(outcome.after.found)} shards, "
                f"{outcome.bytes / 2**20:.1f} MiB")


def _pair_counts(plan: pa.Table) -> dict[str, int]:
    pairs = zip(plan.column(COL_SOURCE_LABEL).to_pylist(), plan.column(COL_TARGET_LABEL).to_pylist())
    return {f"{s}->{t}": n for (s, t), n in sorted(Counter(pairs).items())}


def generate_stage(cfg: GenerateConfig) -> GenerateStage:
    """The stage for `cfg`, its inputs resolved and checked: what `run_generate` runs, and what a
    benchmark drives step by step."""
    if not cfg.out:
        raise DiffmixError("--out is required: where the plan, shards and manifest go")
    return GenerateStage(resolve_inputs(cfg))


def run_generate(cfg: GenerateConfig, overwrite: bool = False) -> dict:
    """Generate every missing pair of the plan; returns the summary written into the manifest."""
    started = time.perf_counter()
    return run_pool_stage(generate_stage(cfg), overwrite, started)
