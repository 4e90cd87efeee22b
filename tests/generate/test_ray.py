"""`generate` end to end on Ray: complete outputs, reruns, exactly-once resume, failed pairs,
text-to-image, S3 output and the CLI.

Small on purpose: each translation actor takes seconds to start, so runs are tiny (24 pairs,
4 steps) and one finished run is shared (copied) by the tests that damage an output."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmix_ray import canonical, storage
from diffmix_ray.contracts import (COL_IMAGE, COL_IMAGE_ID, DATASET_JSON, MANIFEST_JSON, PLAN_DIR, SHARD_SCHEMA,
                                   SHARDS_DIR, SUCCESS)
from diffmix_ray.errors import DiffmixError
from diffmix_ray.generate.config import GenerateConfig
from diffmix_ray.exactly_once import IncompleteOutput
from diffmix_ray.generate.run import run_generate

SMALL = dict(model="tiny", mode="real-mix", multiplier=1, steps=4, batch_size=4, rows_per_shard=8)
DIFFMIX_RAY = os.path.join(os.path.dirname(sys.executable), "diffmix-ray")


def config(dataset: str, out, **overrides) -> GenerateConfig:
    return GenerateConfig(dataset=dataset, out=str(out), **(SMALL | overrides))


def cli_args(dataset: str, out: str, **overrides) -> list[str]:
    """`diffmix-ray generate` flags for the same small run as config()."""
    args = ["generate", "--dataset", dataset, "--out", out]
    for key, value in (SMALL | overrides).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# ---------------------------------------------------------------------------------------------
# Reading an output back
# ---------------------------------------------------------------------------------------------
def shard_names(out: str) -> list[str]:
    return [n for n in storage.list_dir(storage.join(out, SHARDS_DIR)) if n.endswith(".parquet")]


def shard_mtimes(out: str) -> dict[str, float]:
    return {n: os.path.getmtime(os.path.join(out, SHARDS_DIR, n)) for n in shard_names(out)}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def read_shards(out: str) -> pa.Table:
    fs, root = storage.arrow_filesystem(storage.join(out, SHARDS_DIR))
    return pa.concat_tables([pq.read_table(f"{root}/{n}", filesystem=fs) for n in shard_names(out)])


def plan_ids(out: str) -> list[str]:
    fs, root = storage.arrow_filesystem(storage.join(out, PLAN_DIR))
    return pq.read_table(root, filesystem=fs, columns=["pair_id"]).column("pair_id").to_pylist()


def manifest(out: str) -> dict:
    return storage.read_json(storage.join(out, MANIFEST_JSON))


def assert_exact(out: str) -> pa.Table:
    """The shards hold every planned pair exactly once; returns their rows."""
    table = read_shards(out)
    ids = table.column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)), "a pair is in the shards twice"
    assert set(ids) == set(plan_ids(out))
    return table


def source_sizes(dataset: str) -> dict[str, tuple[int, int]]:
    train = canonical.open_dataset(dataset).read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE])
    return {i: Image.open(io.BytesIO(b)).size
            for i, b in zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist())}


def assert_complete(out: str, dataset: str, tokens: list[str], resolution: int | None = None) -> pa.Table:
    """A finished output: _SUCCESS, a full manifest, shards in the contract's schema holding the
    plan exactly, and images that decode at the source's size with prompts naming the target's
    token (`tokens[label]`). Text-to-image modes pass `resolution` instead of source sizes."""
    assert storage.exists(storage.join(out, SUCCESS))
    table = assert_exact(out)
    assert table.schema.remove_metadata().equals(SHARD_SCHEMA)
    m = manifest(out)
    assert m["counts"]["planned"] == m["counts"]["generated"] == table.num_rows
    assert m["counts"]["missing"] == 0 and m["counts"]["failed"] == 0 and m["failed"] == []
    assert sum(m["counts"]["pairs"].values()) == table.num_rows
    info = canonical.open_dataset(dataset).info
    assert m["dataset_fingerprint"] == info.fingerprint and m["model_fingerprint"]
    assert {"ray", "torch", "diffusers", "pyarrow"} <= set(m["versions"])
    assert {"total_s", "generate_s", "images_this_run", "images_per_s"} <= set(m["timings"])
    sizes = source_sizes(dataset) if resolution is None else None
    for row in table.to_pylist():
        img = Image.open(io.BytesIO(row["image"]))
        img.load()  # decodes the whole JPEG, not only its header
        assert img.format == "JPEG" and img.size == (row["width"], row["height"])
        assert img.size == (sizes[row["source_id"]] if sizes else (resolution, resolution))
        assert row["prompt"] == f"a photo of a {tokens[row['target_label']]} {info.super_class}"
    return table


def class_names(dataset: str) -> list[str]:
    return canonical.open_dataset(dataset).info.classes


def bank_tokens(n: int) -> list[str]:
    return [f"<class_{i}>" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The CLI in its own process, with its own private local Ray
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_process(args: list[str], log_path: str):
    """Start `diffmix-ray ARGS` in a new session: it starts its own local Ray (no RAY_ADDRESS),
    bound to loopback, without dashboard, with its files in a fresh short temp dir (Ray's socket
    paths must stay under ~107 bytes). On exit every process of that session is killed."""
    ray_tmp = tempfile.mkdtemp(prefix="dmr-")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, DIFFMIX_RAY_DASHBOARD="0",
               HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([DIFFMIX_RAY, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        kill_session(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def session_members(sid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                members.append(p)
    return members


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything of its session (the Ray it started: GCS, raylet, workers),
    and wait until they are gone, so no test leaves processes behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    members = session_members(proc.pid)  # anything that slipped out of the process group
    for p in members:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(members, timeout=15)
    assert not session_members(proc.pid), "processes of the killed run are still alive"


def run_cli(args: list[str], log_path: str, timeout: float = 240) -> tuple[int, str]:
    """Run the CLI to its end; returns (exit code, its output)."""
    with cli_process(args, log_path) as proc:
        rc = proc.wait(timeout=timeout)
    with open(log_path) as f:
        return rc, f.read()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_mix_run(ray_local, sample_dataset, tmp_path_factory) -> str:
    """One finished real-mix run (24 pairs in 3 shards); tests copy it before changing it."""
    out = str(tmp_path_factory.mktemp("real-mix") / "out")
    run_generate(config(sample_dataset, out))
    return out


def copy_of(run: str, tmp_path) -> str:
    out = str(tmp_path / "out")
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_real_mix_output_is_complete(real_mix_run, sample_dataset):
    table = assert_complete(real_mix_run, sample_dataset, class_names(sample_dataset))
    assert table.num_rows == 24 and len(shard_names(real_mix_run)) == 3  # 24 train images x 1; 8 per shard
    assert manifest(real_mix_run)["timings"]["images_this_run"] == 24


@pytest.mark.slow
def test_rerun_does_nothing_other_config_is_refused_overwrite_replaces(real_mix_run, sample_dataset, tmp_path,
                                                                          capsys):
    out = copy_of(real_mix_run, tmp_path)
    before = shard_mtimes(out)
    run_generate(config(sample_dataset, out))
    assert "nothing to do" in capsys.readouterr().err
    assert shard_mtimes(out) == before
    with pytest.raises(DiffmixError, match="--overwrite"):
        run_generate(config(sample_dataset, out, seed=1))
    assert shard_mtimes(out) == before
    run_generate(config(sample_dataset, out, seed=1, limit=6), overwrite=True)
    table = assert_complete(out, sample_dataset, class_names(sample_dataset))
    assert table.num_rows == 6 and all(i.startswith("s1-") for i in table.column("pair_id").to_pylist())


@pytest.mark.slow
def test_resume_regenerates_exactly_the_lost_pairs(real_mix_run, sample_dataset, tmp_path):
    """What an interrupted run leaves behind: a lost shard, a shard cut short (its footer never
    written) and a shard written twice (a retried write). The rerun regenerates exactly the pairs
    of the first two, drops the duplicates and ends with the plan, each pair once."""
    out = copy_of(real_mix_run, tmp_path)
    original = {r["pair_id"]: r["image"] for r in read_shards(out).to_pylist()}
    lost, cut, twice = (os.path.join(out, SHARDS_DIR, n) for n in shard_names(out))
    lost_ids = set(pq.read_table(lost).column("pair_id").to_pylist())
    cut_ids = set(pq.read_table(cut).column("pair_id").to_pylist())
    twice_rows = pq.read_metadata(twice).num_rows
    os.remove(lost)
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    shutil.copy(twice, os.path.join(out, SHARDS_DIR, "shard-copy.parquet"))
    os.remove(os.path.join(out, SUCCESS))  # as an interrupted run leaves it

    run_generate(config(sample_dataset, out))

    assert_complete(out, sample_dataset, class_names(sample_dataset))
    m = manifest(out)
    assert m["timings"]["images_this_run"] == len(lost_ids | cut_ids)
    assert m["counts"]["unreadable_shards_removed"] == 1
    assert m["counts"]["duplicates_removed"] == twice_rows
    assert not os.path.exists(cut)
    # Each pair's own seed fixes its noise: the regenerated images are the lost ones (up to
    # float rounding of a different batch composition and JPEG).
    for row in read_shards(out).to_pylist():
        if row["pair_id"] in lost_ids | cut_ids:
            assert abs(pixels(row["image"]) - pixels(original[row["pair_id"]])).mean() < 1.0


@pytest.mark.slow
def test_diff_mix_with_concept_bank(ray_local, sample_dataset, tiny_bank, tmp_path):
    from diffmix_ray.models.concepts import load_bank

    out = str(tmp_path / "out")
    run_generate(config(sample_dataset, out, mode="diff-mix", concepts=tiny_bank))
    table = assert_complete(out, sample_dataset, bank_tokens(4))
    assert all(s != t for s, t in zip(table.column("source_label").to_pylist(),
                                      table.column("target_label").to_pylist()))
    assert manifest(out)["concepts_fingerprint"] == load_bank(tiny_bank)[0].fingerprint


def derive_dataset(src: str, dst: str, edit) -> str:
    """A copy of canonical dataset `src` whose train rows went through edit(list of row dicts);
    dataset.json's fingerprint is recomputed so the copy is a consistent canonical dataset."""
    shutil.copytree(src, dst)
    ds = canonical.open_dataset(dst)
    digests = []
    for split in ("train", "val", "test"):
        for uri in ds.files(split):
            rows = pq.read_table(uri).to_pylist()
            if split == "train":
                edit(rows)
                pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(uri)), uri)
            digests += [canonical.row_digest(r["image_id"], r["image"], r["label"], r["split"]) for r in rows]
    info = ds.info
    info.fingerprint = canonical.fingerprint(info.classes, digests)
    storage.write_text_atomic(storage.join(dst, DATASET_JSON), info.to_json())
    return dst


@pytest.mark.slow
def test_source_that_fails_to_decode_is_counted_and_the_rest_is_written(ray_local, sample_dataset, tmp_path):
    """One train image is garbage: its pair fails, is listed in the manifest, the run writes the
    others and ends without _SUCCESS, saying how many are missing. Another train image is 80x48:
    its translation comes back at 80x48, not at the model's 64x64."""
    bad, odd = {}, {}

    def damage(rows):
        bad["id"], rows[0]["image"] = rows[0]["image_id"], b"\xff\xd8\xff garbage, not a JPEG"
        buf = io.BytesIO()
        Image.open(io.BytesIO(rows[1]["image"])).resize((80, 48)).save(buf, format="JPEG")
        odd["id"], rows[1]["image"] = rows[1]["image_id"], buf.getvalue()

    dataset = derive_dataset(sample_dataset, str(tmp_path / "damaged"), damage)
    out = str(tmp_path / "out")
    with pytest.raises(IncompleteOutput, match="1 of 24 pairs are missing .*1 failed"):
        run_generate(config(dataset, out, multiplier=None, per_image=1))  # every source exactly once

    assert not storage.exists(storage.join(out, SUCCESS))
    m = manifest(out)
    assert {k: m["counts"][k] for k in ("planned", "generated", "missing", "failed")} == \
        {"planned": 24, "generated": 23, "missing": 1, "failed": 1}
    plan = pq.read_table(os.path.join(out, PLAN_DIR)).to_pylist()
    bad_pair = next(r["pair_id"] for r in plan if r["source_id"] == bad["id"])
    assert [f["pair_id"] for f in m["failed"]] == [bad_pair]
    assert "failed to decode" in m["failed"][0]["error"]
    rows = {r["source_id"]: r for r in read_shards(out).to_pylist()}
    assert bad["id"] not in rows and (rows[odd["id"]]["width"], rows[odd["id"]]["height"]) == (80, 48)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_diff_gen_to_s3_through_the_cli(sample_dataset, tiny_bank, s3_env, tmp_path):
    """Text-to-image with the bank, written to S3 by the CLI in its own process. That process
    starts its own Ray, whose workers inherit the AWS_* variables from it: the variables must be
    set where Ray starts (a worker never sees what a driver sets later), which is also how a
    cluster provides them (node environment or instance role), never runtime_env."""
    out = s3_env.make_bucket("gen") + "/out"
    rc, log = run_cli(cli_args(sample_dataset, out, mode="diff-gen", concepts=tiny_bank), str(tmp_path / "log"))
    assert rc == 0, log
    table = assert_complete(out, sample_dataset, bank_tokens(4), resolution=64)
    assert set(table.column("strength").to_pylist()) == {1.0} and set(table.column("source_id").to_pylist()) == {None}
    assert table.column("source_label").to_pylist() == table.column("target_label").to_pylist()


def test_plan_calibrate_prints_throughput(sample_dataset):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    result = CliRunner().invoke(app, ["plan", "--dataset", sample_dataset, "--mode", "real-mix", "--steps", "4",
                                      "--batch-size", "4", "--calibrate", "8"])
    assert result.exit_code == 0, result.output
    assert "images/s per actor (calibrated here" in result.output


@pytest.mark.slow
def test_rerun_of_a_complete_output_repairs_a_truncated_shard(real_mix_run, sample_dataset, tmp_path, capsys):
    """A shard cut short after _SUCCESS (a copy that stopped, a disk that lost it): the rerun checks
    the shards' sizes and footers against the manifest, says so, and generates that shard's pairs
    again; training refuses the damaged set, naming the file, until then."""
    from diffmix_ray.synthetic import open_synthetic

    out = copy_of(real_mix_run, tmp_path)
    cut = os.path.join(out, SHARDS_DIR, shard_names(out)[1])
    cut_ids = set(pq.read_table(cut).column("pair_id").to_pylist())
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) - 100)
    fingerprint = canonical.open_dataset(sample_dataset).info.fingerprint
    with pytest.raises(DiffmixError, match=rf"{shard_names(out)[1]} .*(size|footer).*rerun the generate command"):
        open_synthetic(out, fingerprint)

    run_generate(config(sample_dataset, out))
    assert "damaged" in capsys.readouterr().err
    assert_complete(out, sample_dataset, class_names(sample_dataset))
    assert manifest(out)["timings"]["images_this_run"] == len(cut_ids)
    open_synthetic(out, fingerprint)


@pytest.mark.slow
def test_shard_rows_that_disagree_with_the_plan_are_never_marked_complete(real_mix_run, sample_dataset, tmp_path):
    """Rows another writer put in (a strength of 0.5 where this plan says 0.7): refused before _SUCCESS."""
    out = copy_of(real_mix_run, tmp_path)
    name = os.path.join(out, SHARDS_DIR, shard_names(out)[0])
    table = pq.read_table(name)
    strength = pa.array([0.5] * table.num_rows, pa.float32())
    pq.write_table(table.set_column(table.schema.get_field_index("strength"), "strength", strength), name)
    os.remove(os.path.join(out, SUCCESS))
    with pytest.raises(DiffmixError, match=r"8 shard rows disagree with the plan \(e\.g\. pair .*: strength 0\.5 in "
                                           r"the shards, 0\.7 in the plan\).*--overwrite"):
        run_generate(config(sample_dataset, out))
    assert not os.path.exists(os.path.join(out, SUCCESS))


def test_storage_errors_of_ray_tasks_are_one_line():
    """A full disk in a Ray Data write task reaches the driver as a RayTaskError around the OSError:
    it is said in one line naming the output, not as Ray's traceback."""
    import errno

    from ray.exceptions import RayTaskError

    from diffmix_ray.storage import explain_task_error

    cause = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RayTaskError("write", "Traceback ...\nOSError: [Errno 28] No space left on device", cause)
    err = explain_task_error(wrapped, "/data/out")
    assert err is not None and "no space left writing to /data/out" in str(err) and "\n" not in str(err)
    outer = RuntimeError("Ray Data failed")
    outer.__cause__ = wrapped
    assert "no space left" in str(explain_task_error(outer, "/data/out"))
    assert explain_task_error(ValueError("a bug"), "/data/out") is None
