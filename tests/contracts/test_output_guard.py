"""An output can never eat its inputs, and has one writer at a time.

`--out` is checked against every input of a run (equal, containing or inside; local paths
normalised with symlinks resolved, s3:// prefixes) before anything is touched, --overwrite or not.
A lease in the output (atomic create on local disk, a conditional put on S3) refuses a second writer
and names the first; a lease whose process died or whose heartbeat stopped is taken over, said aloud."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from diffmix_ray import canonical, lease, storage
from diffmix_ray.contracts import LEASE_JSON, RUN_JSON
from diffmix_ray.data.prepare import PrepareConfig, prepare
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def raw(tmp_path):
    return fx.make_imagefolder(str(tmp_path / "data" / "raw"), {"a": 3, "b": 3})


@pytest.mark.parametrize("spell", [
    lambda raw: raw,  # the same folder
    lambda raw: raw + "/",  # trailing slash
    lambda raw: os.path.join(raw, "..", "raw"),  # '..'
    lambda raw: os.path.dirname(raw),  # --out contains the source
    lambda raw: os.path.join(raw, "a"),  # --out inside the source
])
def test_prepare_never_overwrites_its_source(tmp_path, raw, spell):
    before = _files(raw)
    with pytest.raises(DiffmixError, match=r"--out .* (is|contains|lies inside) --source"):
        prepare(PrepareConfig("imagefolder", raw, super_class="x"), spell(raw), overwrite=True, show_progress=False)
    assert _files(raw) == before  # nothing was touched


def test_a_symlink_to_the_source_is_the_source(tmp_path, raw):
    link = tmp_path / "link"
    link.symlink_to(raw, target_is_directory=True)
    before = _files(raw)
    with pytest.raises(DiffmixError, match="--source"):
        prepare(PrepareConfig("imagefolder", raw, super_class="x"), str(link), overwrite=True, show_progress=False)
    assert _files(raw) == before


def test_a_derived_dataset_never_overwrites_its_parent(tmp_path, sample_dataset):
    from diffmix_ray.data.derive import DeriveConfig, derive

    parent = shutil.copytree(sample_dataset, tmp_path / "ds")
    with pytest.raises(DiffmixError, match="--from"):
        derive(DeriveConfig(parent=str(parent), shots=1), str(tmp_path), overwrite=True)
    canonical.open_dataset(str(parent))  # still whole


def test_generate_and_train_cls_never_overwrite_their_dataset(tmp_path, sample_dataset):
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_classify
    from diffmix_ray.generate.config import GenerateConfig
    from diffmix_ray.generate.run import run_generate

    ds = str(shutil.copytree(sample_dataset, tmp_path / "ds"))
    before = _files(ds)
    with pytest.raises(DiffmixError, match="--out .* is --dataset"):
        run_generate(GenerateConfig(dataset=ds, out=ds, mode="real-mix"), overwrite=True)
    with pytest.raises(DiffmixError, match="--out .* contains --dataset"):
        run_classify(ClassifyConfig(dataset=ds, out=str(tmp_path), arch="test_resnet", select="last",
                                    batch_size=4), overwrite=True)
    assert _files(ds) == before
    canonical.open_dataset(ds)


def test_inputs_are_compared_as_prefixes_not_strings(tmp_path):
    out = str(tmp_path / "run")
    storage.check_out_of_inputs(out, {"--dataset": str(tmp_path / "run-data"), "--model": None})  # a sibling
    with pytest.raises(DiffmixError, match="contains --dataset"):
        storage.check_out_of_inputs(out, {"--dataset": str(tmp_path / "run" / "data")})
    storage.check_out_of_inputs("s3://b/x", {"--dataset": "s3://b/xy"})
    for spelled in ("s3://b/x/", "s3://b/x/../x", "s3a://b/x"):
        with pytest.raises(DiffmixError, match="is --dataset"):
            storage.check_out_of_inputs("s3://b/x", {"--dataset": spelled})
    with pytest.raises(DiffmixError, match="lies inside --synthetic"):
        storage.check_out_of_inputs("s3://b/x/y/z", {"--synthetic": ["s3://b/other", "s3://b/x/y"]})
    storage.check_out_of_inputs("s3://b/x", {"--dataset": str(tmp_path / "b" / "x")})  # local is not S3


def test_claim_output_requires_the_inputs(tmp_path, raw):
    """The check is part of claiming: no stage can claim an output without naming its inputs."""
    with pytest.raises(DiffmixError, match="is --source"):
        storage.claim_output(raw, "prepare", {}, overwrite=True, inputs={"--source": raw})
    assert not os.path.exists(os.path.join(raw, RUN_JSON))


def test_presigned_s3_urls_are_refused_without_printing_the_signature():
    uri = "s3://bucket/key/data?X-Amz-Signature=deadbeefsecret&X-Amz-Credential=AKIAXXXX"
    with pytest.raises(DiffmixError) as err:
        storage.normalize(uri)
    assert "deadbeefsecret" not in str(err.value) and "AKIAXXXX" not in str(err.value)
    assert "s3://bucket/key/data" in str(err.value) and "query" in str(err.value)
    with pytest.raises(DiffmixError) as err:
        storage.normalize("https://bucket.s3.amazonaws.com/key?X-Amz-Signature=deadbeefsecret")
    assert "deadbeefsecret" not in str(err.value)


def test_read_only_out_is_a_clear_error(tmp_path, monkeypatch):
    real = os.makedirs

    def read_only(path, *a, **kw):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(DiffmixError, match=r"read-only.*choose a writable --out"):
        storage.claim_output(str(tmp_path / "ro" / "out"), "prepare", {}, inputs={})


# ---------------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from diffmix_ray import storage
storage.claim_output(sys.argv[1], "generate", {"strength": float(sys.argv[2])}, inputs={})
print("held", flush=True)
time.sleep(60)
"""


def _holder(out: str, strength: float):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out, str(strength)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("strength", [0.5, 0.7])  # another config, or the very same one
def test_a_second_writer_is_refused_and_told_who_holds_it(tmp_path, strength):
    out = str(tmp_path / "out")
    proc = _holder(out, 0.7)
    try:
        with pytest.raises(DiffmixError, match=rf"{out} is being written by another run \(pid {proc.pid} on "
                                               rf"{socket.gethostname()}"):
            storage.claim_output(out, "generate", {"strength": strength}, inputs={})
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_writers_lease_is_taken_over_and_said(tmp_path, warnings_seen):
    out = str(tmp_path / "out")
    proc = _holder(out, 0.7)
    proc.kill()
    proc.wait()
    assert os.path.exists(os.path.join(out, LEASE_JSON))  # SIGKILL: no chance to release it
    assert storage.claim_output(out, "generate", {"strength": 0.7}, inputs={})  # a resume of its run
    assert any(f"pid {proc.pid}" in w and "no longer running" in w for w in warnings_seen), warnings_seen
    assert json.load(open(os.path.join(out, LEASE_JSON)))["pid"] == os.getpid()
    lease.release_all()
    assert not os.path.exists(os.path.join(out, LEASE_JSON))


def test_an_expired_heartbeat_from_another_host_is_taken_over(tmp_path, warnings_seen):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"owner": "elsewhere", "host": "node-7", "pid": 1, "started_at": 0.0,
             "heartbeat_at": time.time() - 2 * lease.EXPIRES_S, "what": "generate"}
    (out / LEASE_JSON).write_text(json.dumps(stale))
    storage.claim_output(str(out), "generate", {}, inputs={})
    assert any("node-7" in w and "heartbeat" in w for w in warnings_seen), warnings_seen
    fresh = stale | {"heartbeat_at": time.time()}
    lease.release_all()
    (out / LEASE_JSON).write_text(json.dumps(fresh))
    with pytest.raises(DiffmixError, match="pid 1 on node-7"):
        storage.claim_output(str(out), "generate", {}, inputs={})


def test_overwrite_keeps_the_lease(tmp_path):
    out = str(tmp_path / "out")
    storage.claim_output(out, "generate", {"strength": 0.5}, inputs={})
    storage.write_text_atomic(os.path.join(out, "shards", "x.parquet"), "x")
    storage.claim_output(out, "generate", {"strength": 0.7}, overwrite=True, inputs={})
    assert sorted(os.listdir(out)) == sorted([LEASE_JSON, RUN_JSON])
    lease.release_all()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    out = str(tmp_path / "out")
    storage.claim_output(out, "generate", {}, inputs={})
    first = json.load(open(os.path.join(out, LEASE_JSON)))["heartbeat_at"]
    lease._wake.set()  # a heartbeat thread started by an earlier test sleeps on the old interval
    time.sleep(0.5)
    assert json.load(open(os.path.join(out, LEASE_JSON)))["heartbeat_at"] > first
    lease.release_all()


def test_a_scope_releases_only_the_leases_its_own_thread_took(tmp_path):
    """Two stages run in threads of one process: the one that ends first releases its own output's
    lease, not the other's, which is still being written."""
    first_started, second_took, first_ended = threading.Event(), threading.Event(), threading.Event()
    seen: dict = {}

    @lease.scoped
    def first():  # its scope begins before the second takes anything
        first_started.set()
        second_took.wait(10)
        lease.acquire(str(tmp_path / "a"), "first")

    @lease.scoped
    def second():
        first_started.wait(10)
        lease.acquire(str(tmp_path / "b"), "second")
        second_took.set()
        first_ended.wait(10)
        seen["held"] = lease.held()

    def run_first():
        first()
        first_ended.set()

    threads = [threading.Thread(target=run_first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen["held"] == [str(tmp_path / "b")]  # first's end left second's lease alone
    assert lease.held() == []  # each scope released what it took
    assert not os.path.exists(tmp_path / "a" / LEASE_JSON) and not os.path.exists(tmp_path / "b" / LEASE_JSON)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_many_racing_writers_gets_the_lease(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3_env")
        uri = storage.join(s3.make_bucket("lease"), "out", LEASE_JSON)
    else:
        uri = str(tmp_path / "out" / LEASE_JSON)
    wins, barrier = [], threading.Barrier(8)

    def race(i):
        barrier.wait()
        if lease.create_exclusive(uri, {"owner": f"w{i}"}):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert storage.read_json(uri)["owner"] == f"w{wins[0]}"


def test_s3_lease_refuses_and_takes_over(s3_env, warnings_seen):
    out = storage.join(s3_env.make_bucket("lease"), "run")
    stale = {"owner": "elsewhere", "host": "node-7", "pid": 1, "started_at": 0.0,
             "heartbeat_at": time.time(), "what": "generate"}
    storage.write_json_atomic(storage.join(out, LEASE_JSON), stale)
    with pytest.raises(DiffmixError, match="pid 1 on node-7"):
        storage.claim_output(out, "generate", {}, inputs={})
    storage.write_json_atomic(storage.join(out, LEASE_JSON), stale | {"heartbeat_at": 0.0})
    storage.claim_output(out, "generate", {}, inputs={})
    assert storage.read_json(storage.join(out, LEASE_JSON))["pid"] == os.getpid()
    lease.release_all()
    assert not storage.exists(storage.join(out, LEASE_JSON))


def test_copying_a_model_never_overwrites_it(tmp_path):
    from diffmix_ray.models.loader import write_model

    src = write_model("tiny", str(tmp_path / "models" / "tiny"))
    before = _files(src)
    for out in (src, str(tmp_path / "models")):
        with pytest.raises(DiffmixError, match="--out .* (is|contains) the model"):
            write_model(src, out, overwrite=True)
    assert _files(src) == before
