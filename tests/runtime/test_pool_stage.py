"""The actor-pool stage driver (runtime/pool_stage.py) with a stage of its own, on local files and
without Ray: when every planned row is already in the output (a killed run's files, cut short and
duplicated), the driver claims, scans, compacts, settles and writes the manifest without starting
anything, and a rerun of a complete output is left as it is."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmix_ray import lease, storage
from diffmix_ray.contracts import MANIFEST_JSON, RUN_JSON, SUCCESS
from diffmix_ray.errors import DiffmixError
from diffmix_ray.runtime.pool_config import ActorPoolConfig
from diffmix_ray.runtime.pool_stage import Outcome, PoolStage, block_rows, cut_blocks, run_pool_stage


@dataclass(frozen=True)
class Config(ActorPoolConfig):
    rows: int = 4
    batch_size: int = 2


class Stage(PoolStage):
    name, verb = "generate", "made"  # a stage name the metrics know
    schema = pa.schema([pa.field("pair_id", pa.string())])
    file_prefix, file_word, row_words, missing_words = "rows", "file(s)", "rows", "rows are missing"
    versioned = ("pyarrow",)

    def __init__(self, out: str, rows: int = 4):
        super().__init__(Config(rows=rows), out, os.path.join(out, "rows"), {"rows": rows}, 10, 10)
        self.completed_checks = 0

    def input_uris(self):
        return {"--input": None}

    def shared_inputs(self):
        return []

    def make_plan(self):
        return pa.table({"pair_id": [f"p{i}" for i in range(self.cfg.rows)]})

    def complete(self, manifest):
        self.completed_checks += 1
        return f"{manifest['counts']['done']} rows"

    def locate(self, todo):
        raise AssertionError("nothing is left to do: the driver must not locate or start Ray")

    def row_bytes(self):
        return 1

    def steps(self, gpus, chunk_rows):
        raise AssertionError("nothing is left to do")

    def plan_line(self, plan, done, todo):
        return f"{plan.num_rows} rows; done {len(done)}; to do {todo.num_rows}"

    def describe(self, outcome: Outcome):
        return {"counts": {"done": len(outcome.after.done), "missing": len(outcome.missing), "bytes": outcome.bytes,
                           "duplicates_removed": outcome.duplicates_removed,
                           "unreadable_removed": outcome.unreadable_removed}}

    def summary(self, outcome):
        return f"{len(outcome.after.done)} rows"


def _rows(folder, name, ids):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"pair_id": ids}), os.path.join(folder, name))


def _killed_run(stage: Stage) -> None:
    """What a run of `stage` leaves when it is killed after claiming its output (lease gone stale)."""
    storage.claim_output(stage.out, stage.name, stage.identity, inputs={})
    lease.release(stage.out)


def test_rows_a_killed_run_left_are_settled_into_a_complete_output(tmp_path):
    out = str(tmp_path / "out")
    stage = Stage(out)
    _killed_run(stage)
    _rows(stage.rows_dir, "rows-a.parquet", ["p0", "p1"])
    _rows(stage.rows_dir, "rows-b.parquet", ["p1", "p2", "p3"])  # p1 twice: a retried write task
    with open(os.path.join(stage.rows_dir, "rows-c.parquet"), "wb") as f:
        f.write(b"PAR1 cut short")  # a writer killed mid-file
    manifest = run_pool_stage(stage, started=0.0)
    assert manifest["counts"] == {"done": 4, "missing": 0, "bytes": sum(
        os.path.getsize(os.path.join(stage.rows_dir, n)) for n in ("rows-a.parquet", "rows-b.parquet")),
        "duplicates_removed": 1, "unreadable_removed": 1}
    assert manifest["identity"] == {"rows": 4} and manifest["config"]["out"] == out
    assert manifest["config"]["batch_size"] == 2 and manifest["resolved"] == {}  # no work: no GPU question
    assert manifest["timings"]["images_this_run"] == 0 and set(manifest["versions"]) == {"pyarrow"}
    assert json.load(open(os.path.join(out, MANIFEST_JSON))) == manifest
    assert os.path.exists(os.path.join(out, SUCCESS))
    assert json.load(open(os.path.join(out, RUN_JSON)))["stage"] == "generate"
    assert sorted(os.listdir(stage.rows_dir)) == ["rows-a.parquet", "rows-b.parquet"]

    again = Stage(out)
    assert run_pool_stage(again) == manifest and again.completed_checks == 1  # complete: left as it is


def test_a_different_identity_is_refused_and_rows_outside_the_plan_too(tmp_path):
    out = str(tmp_path / "out")
    stage = Stage(out)
    _killed_run(stage)
    _rows(stage.rows_dir, "rows-a.parquet", ["p0", "p1", "p2", "p3"])
    run_pool_stage(stage)
    with pytest.raises(DiffmixError, match="different config"):
        run_pool_stage(Stage(out, rows=3))
    os.remove(os.path.join(out, SUCCESS))
    _rows(stage.rows_dir, "rows-z.parquet", ["q9"])  # written by hand
    with pytest.raises(DiffmixError, match="holds 1 rows that are not in the plan"):
        run_pool_stage(Stage(out))
    assert not os.path.exists(os.path.join(out, SUCCESS))


def test_the_output_may_not_be_an_input(tmp_path):
    out = str(tmp_path / "out")

    class Reading(Stage):
        def input_uris(self):
            return {"--input": out}

    with pytest.raises(DiffmixError, match="--input"):
        run_pool_stage(Reading(out))


@pytest.mark.parametrize("rows, batch, actors, per_block, row_bytes", [
    (6_400_000, 16, 8, 1000, 512 * 512 * 3), (1000, 8, 2, 1024, 2 * 224 * 224 * 3), (13, 8, 4, 1000, 64),
    (10, 4, 1, 3, 1)])
def test_blocks_are_whole_chunks_and_chunks_whole_batches(rows, batch, actors, per_block, row_bytes):
    cfg = Config(batch_size=batch, max_actors=actors)
    block, chunk = block_rows(rows, cfg, per_block, row_bytes)
    assert block % chunk == 0 and chunk % batch == 0 and block < per_block + chunk
    parts = cut_blocks(pa.table({"i": np.arange(rows)}), block)
    assert sum(p.num_rows for p in parts) == rows and max(p.num_rows for p in parts) <= block


def test_rows_without_the_output_schema_are_refused(tmp_path):
    class Valued(Stage):
        schema = pa.schema([pa.field("pair_id", pa.string()), pa.field("value", pa.float32())])

    stage = Valued(str(tmp_path / "out"))
    _killed_run(stage)
    _rows(stage.rows_dir, "rows-a.parquet", ["p0", "p1", "p2", "p3"])  # no "value": not this stage's rows
    with pytest.raises(DiffmixError, match="rows-a.parquet: missing column 'value'"):
        run_pool_stage(stage)
    assert not os.path.exists(os.path.join(stage.out, SUCCESS))
