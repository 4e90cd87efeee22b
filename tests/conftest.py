"""Shared fixtures: a local S3-protocol server (moto) and an AWS environment that points at it.

Tests never reach the Hugging Face hub or real AWS: the hub is forced offline unless a test says
otherwise, and every S3 test runs against moto on 127.0.0.1 with dummy credentials."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import pytest

from diffmix_ray.runtime.local_ray import keep_on_loopback, start_private_ray

# Set before any test imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no 1-2 s instance-metadata probes for credentials
# The network rule: every Ray the tests start (the session's, the CLI's own, the cluster tests' nodes)
# serves on 127.0.0.1 only; asked for 127.0.0.1, Ray on Linux would serve on the LAN address instead.
keep_on_loopback()


def pytest_collection_modifyitems(config, items):
    """Every test that uses the session's Ray (`ray_local`, directly or through a fixture) is marked
    `ray`; the tests that start Ray another way (a CLI process, a head, a cluster) say so themselves.
    `slow`, `e2e` and `cluster` are written on the tests (docs/developing.md)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of one moto S3 server for the whole session, bound to loopback only."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass(frozen=True)
class S3Env:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh uniquely named bucket (moto state lives all session) and return s3://name.
        boto3, not s3fs.mkdir: s3fs sends a LocationConstraint that moto rejects for us-east-1."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the standard AWS env vars at the moto server for one test; yields an S3Env."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)  # never let a developer's real credentials in
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield S3Env(s3_server)


# ---------------------------------------------------------------------------------------------
# One local Ray instance, one prepared sample dataset and one concept bank for the whole session:
# each Ray start costs seconds, each translation actor ~4 s, so tests share them.
# ---------------------------------------------------------------------------------------------
os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster; real clusters use token auth
# Ray Train's controller polls its workers every 2 s by default: each fit's end, each checkpoint's
# registration and each worker death is seen up to one poll late. The tests run dozens of tiny fits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    # 4 logical CPUs on a 2-core machine: translation actors + Ray Data tasks never starve each other.
    # On loopback only, as every private Ray of the project (the network rule).
    start_private_ray(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
                      log_to_driver=False, configure_logging=False,
                      # Keep idle task workers alive between tests: a fresh Ray Data worker process imports torch
                      # and timm (seconds each on 2 cores), which every classifier fit paid again (~15 s) when
                      # Ray culled the idle ones after 1 s. Saves minutes of the suite; no stage relies on it.
                      _system_config={"idle_worker_killing_time_threshold_ms": 600_000, "num_workers_soft_limit": 8})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """The built-in sample dataset (4 classes) prepared as a canonical dataset."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder

    root = tmp_path_factory.mktemp("sample")
    raw = write_sample_imagefolder(str(root / "raw"), num_classes=4, per_class=8)
    out = str(root / "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=SAMPLE_SUPER_CLASS, val_fraction=0.25), out,
            show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory, sample_dataset):
    """A concept bank for the tiny model and the sample dataset: random LoRA + random tokens."""
    from tests.fixtures import make_random_bank

    return make_random_bank(str(tmp_path_factory.mktemp("bank") / "bank"), "tiny", sample_dataset)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """Clearly separable classes (a colour and a shape each), 30 images per class, val and test 20 % each."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import write_sample_imagefolder

    root = tmp_path_factory.mktemp("shapes")
    raw = write_sample_imagefolder(str(root / "raw"), num_classes=4, per_class=30, seed=7, size=48)
    prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0.2, test_fraction=0.2),
            str(root / "ds"), show_progress=False)
    return str(root / "ds")


@pytest.fixture(scope="session")
def shapes_fit(ray_local, shapes, tmp_path_factory):
    """One uninterrupted classifier fit on `shapes` (SHAPES_FIT, test scored every epoch), read-only for
    its users: the real baseline of the label-bookkeeping test, the run `evaluate` and `report` read, and
    the uninterrupted run the node-death test compares with. Returns (out, metrics.json)."""
    import json

    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_classify

    from tests.fixtures import SHAPES_FIT

    out = str(tmp_path_factory.mktemp("shapes-fit") / "run")
    run_classify(ClassifyConfig(dataset=shapes, out=out, test_every_epoch=True, **SHAPES_FIT))
    with open(os.path.join(out, "metrics.json")) as f:
        return out, json.load(f)


@pytest.fixture(scope="session")
def sample_models():
    """The trained `sample` model and CLIP, each loaded once for the session: a Translator per
    (kind, concept bank, class order) and one Scorer per class order, as the semantic tests ask."""
    from diffmix_ray import sample_world as world
    from diffmix_ray.generate.translate import Translator
    from diffmix_ray.score.scorer import Scorer

    cache: dict = {}

    class SampleModels:
        def translator(self, kind: str, concepts: str | None = None, names=world.CLASS_NAMES) -> Translator:
            # the Diff-Mix sampler: DPM-Solver++, 25 steps, guidance 7.5; two single-threaded streams
            key = ("translator", kind, concepts, tuple(names))
            if key not in cache:
                cache[key] = Translator("sample", kind, list(names), world.SUPER_CLASS, concepts=concepts, steps=25,
                                        guidance=7.5, threads=2)
            return cache[key]

        def scorer(self, names=world.CLASS_NAMES) -> Scorer:
            key = ("scorer", tuple(names))
            if key not in cache:
                cache[key] = Scorer("sample", list(names), world.SUPER_CLASS, threads=1)
            return cache[key]

    yield SampleModels()
    cache.clear()


@pytest.fixture
def warnings_seen():
    """Messages logged at WARNING by diffmix_ray (its logger does not propagate once the CLI set it up)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("diffmix_ray").addHandler(handler)
    yield seen
    logging.getLogger("diffmix_ray").removeHandler(handler)
