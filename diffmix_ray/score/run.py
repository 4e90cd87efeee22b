"""The `score` driver: inputs (synthetic shards, the dataset they came from, CLIP, optionally a
classifier) -> claim <synthetic>/scores/<name> -> the pairs of the shards without a score yet ->
Ray Data pipeline (read + decode + resize -> scoring actor -> cast) -> verify -> manifest.json ->
_SUCCESS. Only this module knows about Ray Data; the shards are only ever read.

Exactly-once comes from diffmix_ray/exactly_once.py, as for `generate`: score files are appended
beside the others, a rerun deletes files cut short, compacts duplicated pairs, scores only what is
missing, and writes _SUCCESS when every pair of the shards has exactly one score."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import canonical, exactly_once, lease, storage
from ..console import console, logger
from ..contracts import (CLASS_PROMPT, COL_IMAGE_ID, COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL,
                         MANIFEST_JSON, RUN_JSON, SCORE_COLUMNS, SCORES_DIR, SCORES_VERSION, SUCCESS,
                         object_prompts)
from ..errors import DiffmixError
from ..models.clip import ClipRef, resolve_clip
from ..runtime.jobs import announce
from ..runtime.local_ray import init_ray, resolve_gpus
from ..runtime.nodes import remote_errors_as_one_line
from ..runtime.shared_paths import check_shared_paths
from ..synthetic import SyntheticSet, open_synthetic
from .classifier import ClassifierRun, open_classifier
from .config import ScoreConfig
from .cpu_stages import COL_SRC_FILE, COL_SRC_ROW, COL_SYN_FILE, COL_SYN_ROW, finish_scores, prepare_images

CPU_STAGE_CPUS = 0.25  # reading/decoding and casting: a quarter CPU each, so several run beside the actors
CHUNK_BYTES = 32 * 2**20  # decoded pixels travel to the actors in chunks of at most this many bytes
BLOCK_ROWS = 1024  # rows per plan block: about a generate shard, whose row groups a block reads once
READ_THREADS = 16  # concurrent reads of the shards' key columns when planning
VERSIONED = ("diffmix-ray", "ray", "torch", "transformers", "timm", "pyarrow")


@dataclasses.dataclass
class Inputs:
    cfg: ScoreConfig
    out: str
    synthetic: SyntheticSet
    dataset: canonical.Dataset
    clip: ClipRef
    classifier: ClassifierRun | None
    identity: dict


def resolve_inputs(cfg: ScoreConfig) -> Inputs:
    """Validate the config and every input before any output is touched."""
    cfg.validate()
    syn_uri = storage.normalize(cfg.synthetic)
    storage.check_bucket(syn_uri)
    manifest_uri = storage.join(syn_uri, MANIFEST_JSON)
    if not storage.exists(manifest_uri):
        raise DiffmixError(f"--synthetic {syn_uri} holds no {MANIFEST_JSON}: it is not a `diffmix-ray generate` output "
                           "(or generate has not finished once); run generate there first")
    recorded = storage.read_json(manifest_uri).get("identity", {}).get("dataset")
    if not (cfg.dataset or recorded):
        raise DiffmixError(f"{manifest_uri} records no dataset: pass --dataset (the one the shards were made from)")
    dataset = canonical.open_dataset(cfg.dataset or recorded)
    synthetic = open_synthetic(syn_uri, dataset.info.fingerprint, cfg.allow_incomplete, use="score")
    clip = resolve_clip(cfg.clip)
    info = dataset.info
    classifier = open_classifier(cfg.classifier, info.fingerprint, info.num_classes) if cfg.classifier else None
    identity = {"scores_version": SCORES_VERSION, "synthetic_fingerprint": synthetic.fingerprint,
                "dataset_fingerprint": info.fingerprint, "clip_fingerprint": clip.fingerprint,
                "classifier_fingerprint": classifier.fingerprint if classifier else None}
    out = storage.join(syn_uri, SCORES_DIR, cfg.name)
    return Inputs(cfg, out, synthetic, dataset, clip, classifier, identity)


def _read_keys(uri: str, complete: bool) -> pa.Table | None:
    try:
        return storage.read_parquet(uri, [COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL])
    except DiffmixError as e:
        if complete:
            raise DiffmixError(f"shard {uri} of a complete generate output is unreadable ({e}); the output is "
                               "damaged: rerun generate there") from None
        logger.warning("skipping shard %s, unreadable (being written, or cut short): %s", uri, e)
        return None


def build_plan(inputs: Inputs) -> pa.Table:
    """One row per pair of the shards (the first copy, should an incomplete output hold two): key
    columns and where its synthetic image is (shard file, row). The shards' small key columns are
    read concurrently: thousands of files on S3 cost requests' latency, not bandwidth."""
    from concurrent.futures import ThreadPoolExecutor

    files = inputs.synthetic.files
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = list(pool.map(lambda uri: _read_keys(uri, inputs.synthetic.complete), files))
    parts = [t.append_column(COL_SYN_FILE, pa.array(np.full(t.num_rows, f), pa.int32()))
             .append_column(COL_SYN_ROW, pa.array(np.arange(t.num_rows), pa.int64()))
             for f, t in enumerate(tables) if t is not None]
    if not parts:
        raise DiffmixError(f"{inputs.synthetic.uri} holds no readable shard: nothing to score")
    plan = pa.concat_tables(parts)
    plan = plan.append_column("_i", pa.array(np.arange(plan.num_rows), pa.int64()))
    first = plan.group_by(COL_PAIR_ID, use_threads=False).aggregate([("_i", "min")]).column("_i_min").to_numpy()
    return plan.take(pa.array(np.sort(first))).drop_columns(["_i"])


def locate_sources(inputs: Inputs, todo: pa.Table) -> tuple[pa.Table, list[str]]:
    """`todo` with the train-split file and row of each pair's source image (-1: none), ordered by
    shard file and row; and the train files. A source the dataset lacks is refused."""
    files = inputs.dataset.files("train")
    loc: dict[str, tuple[int, int]] = {}
    for f, uri in enumerate(files):
        for r, image_id in enumerate(storage.read_parquet(uri, [COL_IMAGE_ID]).column(COL_IMAGE_ID).to_pylist()):
            loc[image_id] = (f, r)
    where = []
    for pair, source in zip(todo.column(COL_PAIR_ID).to_pylist(), todo.column(COL_SOURCE_ID).to_pylist()):
        if source is not None and source not in loc:
            raise DiffmixError(f"pair {pair}'s source image {source!r} is not in the train split of "
                               f"{inputs.dataset.uri}")
        where.append(loc.get(source, (-1, -1)) if source is not None else (-1, -1))
    todo = todo.append_column(COL_SRC_FILE, pa.array([w[0] for w in where], pa.int32()))
    todo = todo.append_column(COL_SRC_ROW, pa.array([w[1] for w in where], pa.int64()))
    return todo.sort_by([(COL_SYN_FILE, "ascending"), (COL_SYN_ROW, "ascending")]), files


def block_rows(rows: int, cfg: ScoreConfig, row_bytes: int) -> tuple[int, int]:
    """(most rows per plan block, rows per chunk of decoded pixels), both multiples of the batch
    size. A block is at most about a generate shard (BLOCK_ROWS) and at most a score file (a
    block is never cut into two files); small runs still get >= 2 blocks per actor."""
    b = cfg.batch_size
    per_actor = b * math.ceil(rows / (2 * cfg.max_actors * b))
    target = b * math.ceil(min(BLOCK_ROWS, cfg.rows_per_file) / b)
    chunk = max(b, min(b * (CHUNK_BYTES // (b * row_bytes)), target, per_actor))
    return chunk * max(1, min(math.ceil(target / chunk), math.ceil(per_actor / chunk))), chunk


def plan_blocks(todo: pa.Table, block: int) -> list[pa.Table]:
    """Slices of `todo` (ordered by shard file and row) of at most `block` rows, cut at shard
    boundaries where a shard fits: a block reads whole row groups of the shards it touches, so a
    shard split over two blocks would be read twice."""
    n = todo.num_rows
    files = todo.column(COL_SYN_FILE).to_numpy()
    ends = (np.flatnonzero(np.diff(files)) + 1).tolist() + [n]  # where each shard's rows end
    cuts, start, prev = [], 0, 0
    for end in ends:  # the shard's rows are [prev, end)
        if end - start > block:
            if prev > start:  # close the open block before this shard
                cuts.append((start, prev))
                start = prev
            while end - start > block:  # a shard larger than a block: whole blocks of it
                cuts.append((start, start + block))
                start += block
        prev = end
    if start < n:
        cuts.append((start, n))
    return [todo.slice(a, b - a) for a, b in cuts]


def _ray_pipeline(inputs: Inputs, todo: pa.Table, src_files: list[str], gpus_per_actor: float) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from .scorer import Scorer

    cfg, info = inputs.cfg, inputs.dataset.info
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = console.is_terminal  # job logs: dashboard + summary instead
    ctx.actor_init_retry_on_errors = True  # a flaky model download should not kill the run
    clip_prep = dataclasses.asdict(inputs.clip.prep)
    cls_cfg = inputs.classifier.data_cfg if inputs.classifier else None
    h, w = inputs.clip.prep.output_hw
    row_bytes = 2 * h * w * 3 + (3 * cls_cfg["img_size"] ** 2 if cls_cfg else 0)
    block, chunk = block_rows(todo.num_rows, cfg, row_bytes)
    ds = ray.data.from_arrow(plan_blocks(todo, block))
    ds = ds.map_batches(prepare_images, fn_kwargs=dict(syn_files=inputs.synthetic.files, src_files=src_files,
                                                      clip_prep=clip_prep, cls_cfg=cls_cfg, chunk_rows=chunk),
                        batch_format="pyarrow", batch_size=None, num_cpus=CPU_STAGE_CPUS)
    scorer_args = dict(clip=cfg.clip, class_names=info.classes, super_class=info.super_class,
                       classifier=inputs.classifier.uri if inputs.classifier else None,
                       classifier_fingerprint=inputs.classifier.fingerprint if inputs.classifier else None,
                       device="cuda" if gpus_per_actor > 0 else None, threads=max(1, int(cfg.cpus_per_actor)),
                       report_metrics=True, batch_delay_s=cfg._batch_delay_s)
    remote = {"memory": int(cfg.memory_per_actor_gb * 2**30)} if cfg.memory_per_actor_gb else {}
    ds = ds.map_batches(Scorer, fn_constructor_kwargs=scorer_args, batch_size=cfg.batch_size, batch_format="numpy",
                        num_gpus=gpus_per_actor, num_cpus=cfg.cpus_per_actor,
                        compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors,
                                                  initial_size=cfg.max_actors), **remote)
    ds = ds.map_batches(finish_scores, fn_kwargs={"failed_uri": storage.join(inputs.out, exactly_once.FAILED_DIR)},
                        batch_format="numpy", batch_size=None, num_cpus=CPU_STAGE_CPUS)
    exactly_once.write_appending(ds, inputs.out, "scores", cfg.rows_per_file, CPU_STAGE_CPUS)


def _already_done(inputs: Inputs, plan: pa.Table) -> dict | None:
    """The manifest of a finished run of this config over the shards as they are now, else None."""
    if not storage.exists(storage.join(inputs.out, SUCCESS)):
        return None
    manifest = storage.read_json(storage.join(inputs.out, MANIFEST_JSON))
    same = (manifest.get("synthetic_complete") == inputs.synthetic.complete
            and manifest.get("counts", {}).get("pairs") == plan.num_rows)
    return manifest if same else None  # an incomplete generate output has grown since: score the new pairs


def _check_name_free(inputs: Inputs, overwrite: bool) -> None:
    """Scores of another config under this name: say so in score's terms (storage.claim_output, which
    would refuse too, speaks of --out)."""
    run_json = storage.join(inputs.out, RUN_JSON)
    if overwrite or not storage.exists(run_json):
        return
    have = storage.read_json(run_json)
    if have.get("stage") == "score" and have.get("config_hash") != storage.config_hash(inputs.identity):
        changed = [k for k, v in inputs.identity.items() if have.get("config", {}).get(k) != v]
        raise DiffmixError(f"{inputs.out} holds scores of a different config (other {', '.join(changed)}): pass "
                           f"--name NEW to keep both, or --overwrite to replace them")


@lease.scoped  # the output has one writer while this runs, and none after
def run_score(cfg: ScoreConfig, overwrite: bool = False) -> dict:
    """Score every pair of the shards that has no score yet; returns the manifest."""
    started = time.perf_counter()
    inputs = resolve_inputs(cfg)
    out = inputs.out
    run_id = storage.config_hash(inputs.identity)
    _check_name_free(inputs, overwrite)
    resumed = storage.claim_output(out, "score", inputs.identity, overwrite, inputs={
        "--dataset": inputs.dataset.uri, "--clip": inputs.clip.location, "--classifier": cfg.classifier})
    announce("score", run_id)  # inside a Ray job: where to watch it, which run it is
    plan = build_plan(inputs)
    if resumed and (manifest := _already_done(inputs, plan)):
        console.print(f"{out} is complete ({manifest['counts']['scored']} pairs scored); nothing to do")
        return manifest
    storage.remove_tree(storage.join(out, SUCCESS))
    before = exactly_once.scan_and_compact(out)
    done = before.done
    exactly_once.clear_failures(out)
    todo = plan.filter(pc.invert(pc.is_in(plan.column(COL_PAIR_ID), value_set=pa.array(sorted(done), pa.string()))))
    console.print(f"score: {plan.num_rows} pairs in {len(inputs.synthetic.files)} shards; already scored "
                  f"{len(done & set(plan.column(COL_PAIR_ID).to_pylist()))}; to do {todo.num_rows}"
                  + (f"; deleted {len(before.removed)} unreadable score file(s)" if before.removed else ""))
    score_started = time.perf_counter()
    if todo.num_rows:
        todo, src_files = locate_sources(inputs, todo)
        init_ray(min_cpus=cfg.max_actors * cfg.cpus_per_actor)
        gpus = resolve_gpus(cfg.gpus_per_actor, "score", "actor")
        check_shared_paths("score", [("--synthetic", cfg.synthetic), ("--dataset", inputs.dataset.uri),
                                     ("--clip", cfg.clip), ("--classifier", cfg.classifier)], out)
        from ..runtime.metrics import PlanMetrics

        PlanMetrics(run=run_id, stage="score").set(plan.num_rows, todo.num_rows)
        with remote_errors_as_one_line(out):  # a GPU node without CUDA, a full disk: one line, named
            _ray_pipeline(inputs, todo, src_files, gpus)
    score_seconds = time.perf_counter() - score_started
    planned = set(plan.column(COL_PAIR_ID).to_pylist())
    after, missing = exactly_once.settle(out, planned, "scored pairs", refuse_extra=inputs.synthetic.complete)
    failures = exactly_once.read_failures(out, missing)
    if todo.num_rows:
        PlanMetrics(run=run_id, stage="score").set(plan.num_rows, len(missing))
    scored = len(after.done & planned)
    made_now = len(after.done) - len(done)
    size = exactly_once.files_bytes(out, after.found)
    info = inputs.dataset.info
    manifest = {
        "config": dataclasses.asdict(cfg) | {"out": out},
        "identity": inputs.identity,
        "synthetic": inputs.synthetic.uri, "synthetic_fingerprint": inputs.synthetic.fingerprint,
        "synthetic_complete": inputs.synthetic.complete,
        "dataset": inputs.dataset.uri, "dataset_fingerprint": info.fingerprint,
        "clip": {"spec": inputs.clip.spec, "kind": inputs.clip.kind, "fingerprint": inputs.clip.fingerprint},
        "classifier": inputs.classifier.summary() if inputs.classifier else None,
        "prompts": {"class": CLASS_PROMPT, "object": list(object_prompts(info.super_class))},
        "columns": list(SCORE_COLUMNS),
        "counts": {"pairs": plan.num_rows, "scored": scored, "missing": len(missing), "failed": len(failures),
                   "files": len(after.found), "bytes": size, "duplicates_removed": before.duplicates + after.duplicates,
                   "unreadable_files_removed": len(before.removed) + len(after.removed)},
        "failed": failures[:1000],
        "timings": {"total_s": round(time.perf_counter() - started, 3), "score_s": round(score_seconds, 3),
                    "images_this_run": made_now,
                    "images_per_s": round(made_now / score_seconds, 3) if score_seconds > 0 and made_now else 0.0},
        "versions": exactly_once.versions(VERSIONED),
    }
    summary = (f"scored {made_now} images in {score_seconds:.1f} s ({manifest['timings']['images_per_s']:.2f} "
               f"images/s); {scored}/{plan.num_rows} pairs in {len(after.found)} files"
               + (f"; {len(failures)} failed" if failures else ""))
    return exactly_once.finish(out, manifest, len(missing), plan.num_rows, len(failures), summary,
                               "pairs have no score")
