"""`generate` under faults: a translation actor killed, the driver killed, the S3 server gone for
a while. Whatever happens to the first run, the output ends with the plan's pairs, each once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest

from diffmix_ray import storage
from diffmix_ray.contracts import SHARDS_DIR, SUCCESS
from diffmix_ray.generate.run import run_generate

from tests.generate.test_ray import assert_exact, cli_args, cli_process, config, manifest, run_cli, shard_names
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

# Long enough that a fault lands mid-run: 48 pairs in 6 shards, 10 sampler steps.
LONGER = dict(multiplier=2, steps=10)
PAIRS = 48
TRANSLATOR_TITLE = "ray::MapWorker(MapBatches(Translator))"  # the actor's process title


def readable_shard_rows(out: str) -> int:
    """Rows in shards that are complete files (a shard being written has no footer yet)."""
    fs, root = storage.arrow_filesystem(storage.join(out, SHARDS_DIR))
    rows = 0
    for name in shard_names(out):
        with contextlib.suppress(Exception):
            rows += pq.read_metadata(fs.open_input_file(f"{root}/{name}")).num_rows
    return rows


def translator_processes() -> list[psutil.Process]:
    """Translation actors of this test session's Ray (its processes descend from this one)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith(TRANSLATOR_TITLE):
                found.append(p)
    return found


def test_translation_actor_killed_mid_run(ray_local, sample_dataset, tmp_path):
    """SIGKILL the only translation actor once the first shard is written: Ray restarts it and
    retries its batch; nothing is lost and nothing is written twice."""
    out = str(tmp_path / "out")
    killed: dict = {}

    def kill_actor_after_first_shard():
        with contextlib.suppress(AssertionError):  # the run's own failure is what the test reports
            wait_for(lambda: os.path.isdir(os.path.join(out, SHARDS_DIR)) and readable_shard_rows(out),
                     what="the first shard")
            actor = wait_for(translator_processes, timeout=30, what="the translation actor")[0]
            killed["rows_before"] = readable_shard_rows(out)
            actor.send_signal(signal.SIGKILL)
            killed["pid"] = actor.pid

    killer = threading.Thread(target=kill_actor_after_first_shard, daemon=True)
    killer.start()
    run_generate(config(sample_dataset, out, **LONGER))
    killer.join(timeout=5)

    assert killed.get("pid"), "the actor was never killed: the run ended before its first shard?"
    assert killed["rows_before"] < PAIRS, "the actor was killed after the last shard: not mid-run"
    assert storage.exists(storage.join(out, SUCCESS))
    assert assert_exact(out).num_rows == PAIRS
    assert manifest(out)["timings"]["images_this_run"] == PAIRS


def test_driver_killed_mid_run_then_rerun_resumes(ray_local, sample_dataset, tmp_path):
    """SIGKILL `diffmix-ray generate` (and the local Ray it started) once a shard is complete,
    then run the same configuration again: it keeps the finished shards, deletes any file cut
    short, and generates only what is missing."""
    out = str(tmp_path / "out")
    with cli_process(cli_args(sample_dataset, out, **LONGER), str(tmp_path / "log")) as proc:
        wait_for(lambda: proc.poll() is not None or (os.path.isdir(os.path.join(out, SHARDS_DIR))
                                                     and readable_shard_rows(out)), what="the first shard")
        assert proc.poll() is None, "the run ended before it could be killed"
        # leaving the block SIGKILLs the driver's whole session and checks nothing survives
    kept = readable_shard_rows(out)
    assert 0 < kept < PAIRS and not storage.exists(storage.join(out, SUCCESS))

    # The same configuration, resumed in this process's Ray (the resume reads only storage).
    run_generate(config(sample_dataset, out, **LONGER))

    assert assert_exact(out).num_rows == PAIRS and storage.exists(storage.join(out, SUCCESS))
    assert manifest(out)["timings"]["images_this_run"] <= PAIRS - kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartableS3:
    """A moto S3 server of this test's own on a fixed loopback port, so it can be stopped and
    started again at the same endpoint. moto keeps its buckets in this process, not in the
    server, so a restart loses nothing: it is an outage, not data loss."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture
def own_s3(monkeypatch):
    s3 = RestartableS3()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", s3.endpoint),
                       ("AWS_ENDPOINT_URL_S3", s3.endpoint), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(var, value)
    yield s3
    s3.stop()


def test_s3_server_restarted_during_writes(sample_dataset, own_s3, tmp_path):
    """Stop the S3 server once the first shard is there and start it again 3 s later. The first
    run may ride it out (write retries) or fail; a rerun of the same command ends with the plan."""
    own_s3.client().create_bucket(Bucket="outage")
    out = "s3://outage/out"
    args = cli_args(sample_dataset, out, **LONGER)

    def shards_listed():
        return own_s3.client().list_objects_v2(Bucket="outage", Prefix="out/shards/").get("KeyCount", 0)

    with cli_process(args, str(tmp_path / "log1")) as proc:
        wait_for(lambda: proc.poll() is not None or shards_listed(), what="the first shard on S3")
        if proc.poll() is not None:  # say why: a crash is a finding, not a flake
            raise AssertionError("the run ended before the outage:\n" + open(tmp_path / "log1").read()[-3000:])
        own_s3.stop()
        time.sleep(3)
        own_s3.start()
        first_rc = proc.wait(timeout=240)

    rc, log = run_cli(args, str(tmp_path / "log2"))
    assert rc == 0, log
    assert assert_exact(out).num_rows == PAIRS and storage.exists(storage.join(out, SUCCESS))
    print(f"first run exit code {first_rc}; rerun generated {manifest(out)['timings']['images_this_run']}")
