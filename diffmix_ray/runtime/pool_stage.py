"""One driver for the stages that run on a Ray Data actor pool (`generate`, `score`).

A stage declares what is its own (a `PoolStage`): its plan (one row per output row, keyed by
`pair_id`), where each row's inputs live (`locate`), its three steps (a CPU step before the actor
that reads and decodes, the actor that does the model work, a CPU step after it that casts to the
output schema and records failures), where its keyed Parquet files go and what its manifest says.
`run_pool_stage` owns everything else, the same way for every stage:

  claim      the output (one writer: a lease; never an input of the run), announce the run
  skip       a finished run of the same config is left as it is (the stage says when it still is)
  scan       delete files cut short, compact duplicated rows (exactly_once.py): what is done
  join Ray   start or join Ray, the GPU default (what the cluster has or its autoscaler can add),
             and every local input seen the same from every node
  pipeline   blocks of the plan -> before -> actor pool -> after -> Parquet files appended beside
             the others, inside `remote_errors_as_one_line(out)`
  settle     scan and compact again, compare with the plan, read back the failures
  manifest   manifest.json, then _SUCCESS only when nothing is missing

Only this module (and the stages' per-batch code it runs) knows about Ray Data."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import exactly_once, lease, storage
from ..console import console
from ..contracts import COL_PAIR_ID, MANIFEST_JSON, SUCCESS, check_columns
from .pool_config import ActorPoolConfig

# The CPU steps (read + decode before the actor, cast + encode after it, the file writes) cost a few
# ms of CPU per row and partly wait on storage: a quarter CPU each lets several run beside the
# actors instead of queueing for a whole core.
CPU_STAGE_CPUS = 0.25
# Decoded pixels travel from the step before the actor to the actors in chunks of at most this
# many bytes (a multiple of the batch size in rows); Ray Data coalesces them into blocks of whole
# chunks, so the actors' batches come out full.
CHUNK_BYTES = 32 * 2**20
FAILED_LIST = 1000  # failure records a manifest lists (the count is always whole)


@dataclass
class Step:
    """A function Ray Data runs in its own CPU workers, and the keyword arguments it gets."""

    fn: Callable
    kwargs: dict = field(default_factory=dict)


@dataclass
class Steps:
    """The pipeline of one stage.
      before  (pyarrow block of plan rows, chunk_rows=, **kwargs) -> yields chunks of actor input;
              None: the actor takes plan rows as they are
      actor   a callable class: actor(**actor_kwargs, device=, threads=, report_metrics=)(batch)
      after   (numpy batch, failed_uri=, **kwargs) -> a pyarrow table of the output schema"""

    before: Step | None
    actor: type
    actor_kwargs: dict
    actor_batch_rows: int  # rows per actor call
    after: Step


@dataclass
class Outcome:
    """What one run did, for the stage's manifest and summary."""

    plan: pa.Table
    before: exactly_once.Scan  # the output as the run found it (after scan and compaction)
    after: exactly_once.Scan  # ... and as it left it
    missing: set[str]
    failures: list[dict]
    seconds: float  # of the pipeline
    file_bytes: dict[str, int]  # output file -> its size, for the files `after` found

    @property
    def bytes(self) -> int:
        return sum(self.file_bytes.values())

    @property
    def made_now(self) -> int:
        return len(self.after.done) - len(self.before.done)

    @property
    def duplicates_removed(self) -> int:
        return self.before.duplicates + self.after.duplicates

    @property
    def unreadable_removed(self) -> int:
        return len(self.before.removed) + len(self.after.removed)


class PoolStage(ABC):
    """What an actor-pool stage declares; `run_pool_stage` does the rest. A subclass sets the
    class attributes below and implements the abstract methods."""

    name: str  # "generate" | "score": the output's owner in _run.json, metric names, messages
    verb: str  # what the actors do to a row, in the summary: "generated", "scored"
    key: str = COL_PAIR_ID  # the column that makes a row unique
    schema: pa.Schema  # of the output's rows (what the step after the actor casts to)
    file_prefix: str  # output files are <file_prefix>-<write uuid>-<task>-<i>.parquet
    file_word: str  # what an output file is called in messages: "shard(s)", "score file(s)"
    row_words: str  # what the output's rows are called in messages: "pairs", "scored pairs"
    missing_words: str  # the end of "N of M <missing_words>" when rows are missing
    refuse_extra: bool = True  # rows outside the plan mean the output was changed by hand
    block_group: str | None = None  # a column whose runs of equal values a block should not cut
    versioned: tuple[str, ...]  # packages whose versions the manifest records

    def __init__(self, cfg: ActorPoolConfig, out: str, rows_dir: str, identity: dict, rows_per_file: int,
                 rows_per_block: int, resolved: dict | None = None) -> None:
        self.cfg = cfg
        self.out = out  # what the stage owns: _run.json, the lease, failed/, manifest.json, _SUCCESS
        self.rows_dir = rows_dir  # where the keyed Parquet files go (out itself, or a folder in it)
        self.identity = identity  # what decides the output: the same identity resumes
        self.rows_per_file = rows_per_file
        self.rows_per_block = rows_per_block  # a plan block is about this many rows (~ an input file)
        self.resolved = resolved if resolved is not None else {}  # option -> {"value", "from"}

    # -------------------------------------------------------------------------------------------
    # What the stage declares
    # -------------------------------------------------------------------------------------------
    @abstractmethod
    def input_uris(self) -> storage.Inputs:
        """Flag -> URI of every input the run reads: --out may be none of them, nor hold one."""

    @abstractmethod
    def shared_inputs(self) -> list[tuple[str, str | None]]:
        """(flag, URI) of the inputs every node reads: local ones must be on a shared mount."""

    @abstractmethod
    def make_plan(self) -> pa.Table:
        """Every row the output must hold, one per key, with what the actors need to make it."""

    def keep_plan(self, plan: pa.Table) -> None:
        """Store the plan in the output, for a stage that keeps it (once the output is claimed)."""

    @abstractmethod
    def complete(self, manifest: dict) -> str | None:
        """For an output with _SUCCESS: what it holds, in words, while it is still complete; None
        when it must be made again (the stage repairs what it found damaged)."""

    @abstractmethod
    def locate(self, todo: pa.Table) -> pa.Table:
        """`todo` (rows of the plan still missing) with where each row's inputs are, in the order
        the pipeline should run them."""

    @abstractmethod
    def row_bytes(self) -> int:
        """Bytes of one row of the actor's input (its decoded pixels)."""

    @abstractmethod
    def steps(self, gpus: float, chunk_rows: int) -> Steps:
        """The stage's Ray Data steps, with rows per chunk of decoded pixels."""

    @abstractmethod
    def plan_line(self, plan: pa.Table, done: set[str], todo: pa.Table) -> str:
        """The line that says what the run is about to do."""

    def check_rows(self, scan: exactly_once.Scan, plan: pa.Table) -> None:
        """After the run: refuse rows that another writer put there (the stage knows how)."""

    @abstractmethod
    def describe(self, outcome: Outcome) -> dict:
        """The stage's own manifest fields (its inputs, counts...); config, identity, resolved,
        failed, timings and versions are added around them."""

    @abstractmethod
    def summary(self, outcome: Outcome) -> str:
        """The end of the last line, after "<verb> N images in S s (R images/s); "."""

    # -------------------------------------------------------------------------------------------
    # Derived, the same for every stage
    # -------------------------------------------------------------------------------------------
    @functools.cached_property
    def plan(self) -> pa.Table:
        return self.make_plan()

    def todo(self, plan: pa.Table, done: set[str]) -> pa.Table:
        """The rows of `plan` not in `done`, located and ordered (unlocated when there are none)."""
        todo = plan.filter(pc.invert(pc.is_in(plan.column(self.key), value_set=pa.array(sorted(done), pa.string()))))
        return self.locate(todo) if todo.num_rows else todo

    def blocking(self, rows: int) -> tuple[int, int]:
        """(rows per plan block, rows per chunk of decoded pixels) of a run of `rows` rows."""
        return block_rows(rows, self.cfg, self.rows_per_block, self.row_bytes())

    def print_resolved(self) -> None:
        print_resolved(self.resolved)


def print_resolved(resolved: dict) -> None:
    """One line per option the stage resolved: its value and where it came from."""
    for name, r in resolved.items():
        console.print(f"{name.replace('_', '-')}: {r['value']} ({r['from']})", highlight=False)


def block_rows(rows: int, cfg: ActorPoolConfig, rows_per_block: int, row_bytes: int) -> tuple[int, int]:
    """(rows per plan block, rows per chunk of decoded pixels), both multiples of the batch size.
    A plan block is about `rows_per_block` rows (the driver's cost is per block: 6.4M rows in
    32-row blocks are 200k blocks per step, in 1,000-row blocks 6.4k), but small runs still get
    >= 2 blocks per actor so every actor has work. A chunk holds at most CHUNK_BYTES of pixels."""
    b = cfg.batch_size
    per_actor = b * math.ceil(rows / (2 * cfg.max_actors * b))
    target = b * math.ceil(rows_per_block / b)
    chunk = max(b, min(b * (CHUNK_BYTES // (b * row_bytes)), target, per_actor))
    return chunk * max(1, min(math.ceil(target / chunk), math.ceil(per_actor / chunk))), chunk


def cut_blocks(todo: pa.Table, block: int, group: str | None = None) -> list[pa.Table]:
    """Slices of `todo` of at most `block` rows. With `group` (a column whose equal values are
    contiguous, e.g. the input file a row reads), cut where a group ends whenever a group fits:
    a block reads whole row groups of the files it touches, so a file split over two blocks would
    be read twice."""
    n = todo.num_rows
    if group is None:
        return [todo.slice(i, block) for i in range(0, n, block)]
    values = todo.column(group).to_numpy()
    ends = (np.flatnonzero(np.diff(values)) + 1).tolist() + [n]  # where each group's rows end
    cuts, start, prev = [], 0, 0
    for end in ends:  # the group's rows are [prev, end)
        if end - start > block:
            if prev > start:  # close the open block before this group
                cuts.append((start, prev))
                start = prev
            while end - start > block:  # a group larger than a block: whole blocks of it
                cuts.append((start, start + block))
                start += block
        prev = end
    if start < n:
        cuts.append((start, n))
    return [todo.slice(a, b - a) for a, b in cuts]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def build_dataset(stage: PoolStage, todo: pa.Table, gpus: float, steps: Steps | None = None):
    """The Ray Dataset of the stage's output rows for `todo` (lazy: nothing runs until it is
    written). `steps` replaces the stage's own, so that a benchmark can run this very pipeline with
    no-op steps and measure what the machinery costs."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    cfg = stage.cfg
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = console.is_terminal  # job logs: dashboard + summary instead
    ctx.actor_init_retry_on_errors = True  # a flaky model download should not kill the run
    block, chunk = stage.blocking(todo.num_rows)
    steps = steps or stage.steps(gpus, chunk)
    # from_blocks reads each block's metadata here; from_arrow sends a Ray task per block to read it, which
    # waits for a free CPU (a worker process to start, on a busy or scaling cluster) before anything runs.
    ds = ray.data.from_blocks(cut_blocks(todo, block, stage.block_group))
    if steps.before is not None:
        ds = ds.map_batches(steps.before.fn, fn_kwargs=steps.before.kwargs | {"chunk_rows": chunk},
                            batch_format="pyarrow", batch_size=None, num_cpus=CPU_STAGE_CPUS)
    actor_kwargs = steps.actor_kwargs | {"device": "cuda" if gpus > 0 else None,
                                         "threads": max(1, int(cfg.cpus_per_actor)), "report_metrics": True}
    ds = ds.map_batches(steps.actor, fn_constructor_kwargs=actor_kwargs, batch_size=steps.actor_batch_rows,
                        batch_format="numpy", compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors,
                                                                        initial_size=cfg.max_actors),
                        **cfg.actor_resources(gpus))
    failed_uri = storage.join(stage.out, exactly_once.FAILED_DIR)
    return ds.map_batches(steps.after.fn, fn_kwargs=steps.after.kwargs | {"failed_uri": failed_uri},
                          batch_format="numpy", batch_size=None, num_cpus=CPU_STAGE_CPUS)


def write_rows(stage: PoolStage, ds) -> None:
    """Append the dataset's rows to the stage's folder as Parquet files (exactly_once.py)."""
    exactly_once.write_appending(ds, stage.rows_dir, stage.file_prefix, stage.rows_per_file, CPU_STAGE_CPUS)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
@lease.scoped  # the output has one writer while this runs, and none after
def run_pool_stage(stage: PoolStage, overwrite: bool = False, started: float | None = None) -> dict:
    """Make every missing row of the stage's plan; returns the manifest. `started`: when the
    stage began resolving its inputs (the manifest's total time counts from there)."""
    from .jobs import announce
    from .local_ray import init_ray, resolve_gpus
    from .metrics import PlanMetrics
    from .nodes import remote_errors_as_one_line
    from .shared_paths import check_shared_paths

    started = time.perf_counter() if started is None else started
    cfg, out = stage.cfg, stage.out
    run_id = storage.config_hash(stage.identity)
    resumed = storage.claim_output(out, stage.name, stage.identity, overwrite, inputs=stage.input_uris())
    announce(stage.name, run_id)  # inside a Ray job: where to watch it, which run it is
    if resumed and storage.exists(storage.join(out, SUCCESS)):
        manifest = storage.read_json(storage.join(out, MANIFEST_JSON))
        if holds := stage.complete(manifest):
            console.print(f"{out} is complete ({holds}); nothing to do")
            return manifest
    storage.remove_tree(storage.join(out, SUCCESS))
    plan = stage.plan
    stage.keep_plan(plan)
    before = exactly_once.scan_and_compact(stage.rows_dir, stage.key)
    exactly_once.clear_failures(out)
    todo = stage.todo(plan, before.done)
    stage.print_resolved()
    console.print(stage.plan_line(plan, before.done, todo)
                  + (f"; deleted {len(before.removed)} unreadable {stage.file_word}" if before.removed else ""))
    work_started = time.perf_counter()
    if todo.num_rows:
        init_ray(min_cpus=cfg.max_actors * cfg.cpus_per_actor)
        gpus = resolve_gpus(cfg.gpus_per_actor, stage.name, "actor")
        check_shared_paths(stage.name, stage.shared_inputs(), out)
        stage.resolved["gpus_per_actor"] = {"value": gpus, "from": "--gpus-per-actor" if cfg.gpus_per_actor
                                            is not None else "default: what the Ray cluster has or can add"}
        PlanMetrics(run_id, stage.name).set(plan.num_rows, todo.num_rows)
        with remote_errors_as_one_line(out):  # a GPU node without CUDA, a full disk: one line, named
            write_rows(stage, build_dataset(stage, todo, gpus))
    seconds = time.perf_counter() - work_started
    planned = set(plan.column(stage.key).to_pylist())
    after, missing = exactly_once.settle(stage.rows_dir, planned, stage.row_words, stage.key,
                                         refuse_extra=stage.refuse_extra)
    if after.found:  # what readers check too: the output's files hold the contract's columns
        first = storage.join(stage.rows_dir, min(after.found))
        fs, path = storage.arrow_filesystem(first)
        with storage.explained(first):
            check_columns(pq.read_schema(path, filesystem=fs), stage.schema, first)
    stage.check_rows(after, plan)
    failures = exactly_once.read_failures(out, missing, stage.key)
    if todo.num_rows:
        PlanMetrics(run_id, stage.name).set(plan.num_rows, len(missing))
    sizes = storage.file_sizes(stage.rows_dir)
    outcome = Outcome(plan, before, after, missing, failures, seconds, {n: sizes[n] for n in after.found})
    rate = round(outcome.made_now / seconds, 3) if seconds > 0 and outcome.made_now else 0.0
    manifest = ({"config": dataclasses.asdict(cfg) | {"out": out}, "identity": stage.identity,
                 "resolved": stage.resolved}
                | stage.describe(outcome)
                | {"failed": failures[:FAILED_LIST],
                   "timings": {"total_s": round(time.perf_counter() - started, 3), f"{stage.name}_s": round(seconds, 3),
                               "images_this_run": outcome.made_now, "images_per_s": rate},
                   "versions": exactly_once.versions(stage.versioned)})
    summary = (f"{stage.verb} {outcome.made_now} images in {seconds:.1f} s ({rate:.2f} images/s); "
               + stage.summary(outcome))
    return exactly_once.finish(out, manifest, len(missing), plan.num_rows, len(failures), summary,
                               stage.missing_words)
