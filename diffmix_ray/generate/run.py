"""The `generate` driver: plan -> (resume: what is missing) -> Ray Data pipeline -> verify ->
manifest.json -> _SUCCESS. Only this module knows about Ray Data.

Exactly-once (diffmix_ray/exactly_once.py, shared with `score`): shard files are written by
`write_parquet` into <out>/shards/. A rerun reads the pair_ids of the shards that exist (an
unreadable file, e.g. cut short by a killed driver, is deleted: its pairs are simply redone),
generates only the missing pairs, then verifies that the shard set equals the plan; duplicates (a
pair in two files) are compacted away before _SUCCESS."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from .. import canonical, exactly_once, lease, storage
from ..console import console, logger
from ..contracts import (COL_IMAGE_ID, COL_LABEL, COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH,
                         COL_TARGET_LABEL, MANIFEST_JSON, PLAN_DIR, SHARDS_DIR, SUCCESS)
from ..errors import DiffmixError
from ..exactly_once import FAILED_DIR
from ..runtime.jobs import announce
from ..synthetic import damaged_shards, describe_damage, shard_records
from ..runtime.local_ray import init_ray, resolve_gpus
from ..runtime.nodes import remote_errors_as_one_line
from ..runtime.shared_paths import check_shared_paths
from ..models import concepts as bank_io
from ..models.loader import resolve_model
from .config import GenerateConfig
from .cpu_stages import COL_FILE, COL_ROW, finish_images, prepare_sources  # no torch in their workers
from .plan import denoising_steps, make_plan
from .translate import Translator

PLAN_FILE = "plan-00000.parquet"
# The CPU stages (read + decode + resize before, resize + JPEG after, the shard writes) cost a few
# ms of CPU per image and partly wait on storage: a quarter CPU each lets several run beside the
# translation actors instead of queueing for a whole core.
CPU_STAGE_CPUS = 0.25
# Decoded pixels travel from the stage before translation to the actors in chunks of at most
# this many bytes (a multiple of the batch size in rows); Ray Data coalesces them into blocks of
# whole chunks, so the actors' batches come out full.
CHUNK_BYTES = 32 * 2**20
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
        for name, r in self.resolved.items():
            console.print(f"{name.replace('_', '-')}: {r['value']} ({r['from']})", highlight=False)


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
    identity = _normalized(cfg.output_identity()) | {
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


def _todo(inputs: Inputs, plan: pa.Table, done: set[str]) -> tuple[pa.Table, list[str]]:
    """Plan rows still missing, with the location of their source image, ordered so that a batch
    runs one number of denoising steps (one pipeline call) and reads neighbouring rows of a shard."""
    todo = plan.filter(pc.invert(pc.is_in(plan.column(COL_PAIR_ID), value_set=pa.array(sorted(done), pa.string()))))
    files = inputs.dataset.files("train")
    if inputs.cfg.kind == "gen":
        return todo.sort_by([(COL_TARGET_LABEL, "ascending")]), files
    loc: dict[str, tuple[int, int]] = {}
    for f, uri in enumerate(files):
        for r, image_id in enumerate(storage.read_parquet(uri, [COL_IMAGE_ID]).column(COL_IMAGE_ID).to_pylist()):
            loc[image_id] = (f, r)
    where = [loc[i] for i in todo.column(COL_SOURCE_ID).to_pylist()]
    steps = [denoising_steps(s, inputs.cfg.steps) for s in todo.column(COL_STRENGTH).to_pylist()]
    todo = todo.append_column(COL_FILE, pa.array([w[0] for w in where], pa.int32()))
    todo = todo.append_column(COL_ROW, pa.array([w[1] for w in where], pa.int64()))
    todo = todo.append_column("_steps", pa.array(steps, pa.int32()))
    todo = todo.sort_by([("_steps", "ascending"), (COL_FILE, "ascending"), (COL_ROW, "ascending")])
    return todo.drop_columns(["_steps"]), files


def block_rows(rows: int, cfg: GenerateConfig, resolution: int) -> tuple[int, int]:
    """(rows per plan block, rows per chunk of decoded pixels), both multiples of the batch size.
    A plan block is about a shard (the driver's cost is per block: 6.4M pairs in 32-row blocks
    are 200k blocks per stage, in 1,000-row blocks 6.4k), but small runs still get >= 2 blocks
    per actor so every actor has work."""
    b = cfg.batch_size
    per_actor = b * math.ceil(rows / (2 * cfg.max_actors * b))
    shard = b * math.ceil(cfg.rows_per_shard / b)
    chunk = max(b, min(b * (CHUNK_BYTES // (b * resolution * resolution * 3)), shard, per_actor))
    return chunk * max(1, min(math.ceil(shard / chunk), math.ceil(per_actor / chunk))), chunk


def _ray_pipeline(inputs: Inputs, todo: pa.Table, files: list[str], gpus_per_actor: float,
                  translator=Translator, before=prepare_sources, after=finish_images) -> None:
    """The Ray Data pipeline. The stages are parameters so that bench/bench_generate_overhead.py can
    run this very pipeline with no-op stages and measure what the machinery itself costs."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    cfg = inputs.cfg
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = console.is_terminal  # job logs: dashboard + summary instead
    ctx.actor_init_retry_on_errors = True  # a flaky model download should not kill the run
    info = inputs.dataset.info
    block, chunk = block_rows(todo.num_rows, cfg, inputs.resolution)
    ds = ray.data.from_arrow([todo.slice(i, block) for i in range(0, todo.num_rows, block)])
    if cfg.kind != "gen":
        ds = ds.map_batches(before, fn_kwargs={"files": files, "resolution": inputs.resolution,
                                                         "chunk_rows": chunk},
                            batch_format="pyarrow", batch_size=None, num_cpus=CPU_STAGE_CPUS)
    translator_args = dict(model=cfg.model, kind=cfg.kind, class_names=info.classes, super_class=info.super_class,
                           concepts=cfg.concepts, steps=cfg.steps, guidance=cfg.guidance,
                           prompt_template=cfg.prompt_template, threads=max(1, int(cfg.cpus_per_actor)),
                           device="cuda" if gpus_per_actor > 0 else None, batch_size=cfg.batch_size,
                           compile=cfg.compile, compile_cache=cfg.compile_cache, report_metrics=True)
    remote = {}
    if cfg.memory_per_actor_gb:
        remote["memory"] = int(cfg.memory_per_actor_gb * 2**30)
    # The actor takes whole chunks and cuts its own device batches of --batch-size: Ray Data's cost per
    # call (~1 ms: slicing, format conversions) is paid per chunk, and step groups form over the chunk.
    ds = ds.map_batches(translator, fn_constructor_kwargs=translator_args, batch_size=chunk,
                        batch_format="numpy", num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor,
                        compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors,
                                                  initial_size=cfg.max_actors), **remote)
    ds = ds.map_batches(after, fn_kwargs={"failed_uri": storage.join(inputs.out, FAILED_DIR),
                                                  "jpeg_quality": cfg.jpeg_quality},
                        batch_format="numpy", batch_size=None, num_cpus=CPU_STAGE_CPUS)
    exactly_once.write_appending(ds, storage.join(inputs.out, SHARDS_DIR), "shard", cfg.rows_per_shard,
                                 CPU_STAGE_CPUS)


def _pair_counts(plan: pa.Table) -> dict[str, int]:
    pairs = zip(plan.column(COL_SOURCE_LABEL).to_pylist(), plan.column(COL_TARGET_LABEL).to_pylist())
    return {f"{s}->{t}": n for (s, t), n in sorted(Counter(pairs).items())}


@lease.scoped  # the output has one writer while this runs, and none after
def run_generate(cfg: GenerateConfig, overwrite: bool = False) -> dict:
    """Generate every missing pair of the plan; returns the summary written into the manifest."""
    started = time.perf_counter()
    if not cfg.out:
        raise DiffmixError("--out is required: where the plan, shards and manifest go")
    inputs = resolve_inputs(cfg)
    cfg, out = inputs.cfg, inputs.out
    resumed = storage.claim_output(out, "generate", inputs.identity, overwrite, inputs={
        "--dataset": inputs.dataset.uri, "--model": inputs.model_location, "--concepts": cfg.concepts})
    announce("generate", storage.config_hash(inputs.identity))  # inside a Ray job: where to watch it, which run it is
    shards = storage.join(out, SHARDS_DIR)
    if resumed and storage.exists(storage.join(out, SUCCESS)):
        manifest = storage.read_json(storage.join(out, MANIFEST_JSON))
        if not (damaged := damaged_shards(out, manifest)):
            console.print(f"{out} is complete ({manifest['counts']['generated']} images); nothing to do")
            return manifest
        console.print(f"{out} was complete, but {len(damaged)} shard(s) are damaged: {describe_damage(damaged)}; "
                      "deleting them and generating their pairs again", style="yellow")
        for name in damaged:
            storage.remove_tree(storage.join(shards, name))
    storage.remove_tree(storage.join(out, SUCCESS))
    plan = build_plan(inputs)
    write_plan(out, plan)
    before = exactly_once.scan_and_compact(shards)
    done = before.done
    exactly_once.clear_failures(out)
    todo, files = _todo(inputs, plan, done)
    inputs.print_resolved()
    console.print(f"plan: {plan.num_rows} pairs ({cfg.mode}); already generated {len(done)}; to do {todo.num_rows}"
                  + (f"; deleted {len(before.removed)} unreadable shard(s)" if before.removed else ""))
    gen_started = time.perf_counter()
    if todo.num_rows:
        init_ray(min_cpus=cfg.max_actors * cfg.cpus_per_actor)
        gpus = resolve_gpus(cfg.gpus_per_actor, "generate", "actor")
        check_shared_paths("generate", [("--dataset", cfg.dataset), ("--model", cfg.model),
                                        ("--concepts", cfg.concepts)], out)
        inputs.resolved["gpus_per_actor"] = {"value": gpus, "from": "--gpus-per-actor" if cfg.gpus_per_actor
                                             is not None else "default: what the Ray cluster has or can add"}
        from ..runtime.metrics import PlanMetrics

        gauges = PlanMetrics(run=storage.config_hash(inputs.identity))
        gauges.set(plan.num_rows, todo.num_rows)
        with remote_errors_as_one_line(out):  # a GPU node without CUDA, a full disk: one line, named
            _ray_pipeline(inputs, todo, files, gpus)
    gen_seconds = time.perf_counter() - gen_started
    planned = set(plan.column(COL_PAIR_ID).to_pylist())
    after, missing = exactly_once.settle(shards, planned, "pairs")
    disagree, example = exactly_once.disagreeing_rows(shards, after.found, plan)
    if disagree:  # another writer's rows (another strength, seed...): never marked complete
        raise DiffmixError(f"{disagree} shard rows disagree with the plan (e.g. {example}): another run wrote into "
                           f"{out}; rerun with --overwrite to generate it again from scratch")
    done_after = after.done
    failures = exactly_once.read_failures(out, missing)
    if todo.num_rows:
        import ray

        if ray.is_initialized():
            PlanMetrics(run=storage.config_hash(inputs.identity)).set(plan.num_rows, len(missing))
    made_now = len(done_after) - len(done)
    shard_files = shard_records(shards, after.found)
    shard_bytes = sum(r["bytes"] for r in shard_files.values())
    manifest = {
        "config": dataclasses.asdict(cfg) | {"out": out},
        "identity": inputs.identity,
        "resolved": inputs.resolved,
        "dataset_fingerprint": inputs.dataset.info.fingerprint,
        "model_fingerprint": inputs.model_fingerprint,
        "concepts_fingerprint": inputs.bank.fingerprint if inputs.bank else None,
        "counts": {"planned": plan.num_rows, "generated": len(done_after), "missing": len(missing),
                   "failed": len(failures), "shards": len(after.found), "bytes": shard_bytes,
                   "pairs": _pair_counts(plan), "duplicates_removed": before.duplicates + after.duplicates,
                   "unreadable_shards_removed": len(before.removed) + len(after.removed)},
        "failed": failures[:1000],
        "shard_files": shard_files,  # rows and bytes per file: a rerun and every reader check the shards by it
        "timings": {"total_s": round(time.perf_counter() - started, 3), "generate_s": round(gen_seconds, 3),
                    "images_this_run": made_now,
                    "images_per_s": round(made_now / gen_seconds, 3) if gen_seconds > 0 and made_now else 0.0},
        "versions": exactly_once.versions(VERSIONED),
    }
    summary = (f"generated {made_now} images in {gen_seconds:.1f} s ({manifest['timings']['images_per_s']:.2f} images/s); "
               f"{len(done_after)}/{plan.num_rows} pairs in {len(after.found)} shards, {shard_bytes / 2**20:.1f} MiB")
    return exactly_once.finish(out, manifest, len(missing), plan.num_rows, len(failures), summary, "pairs are missing")
