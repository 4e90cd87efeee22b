"""Running it for real: cluster configs, KubeRay manifests, the image's build inputs, and the job
path end to end on a real Ray head started with `ray start` on loopback: `ray job submit` of
generate and train-cls, a recipe run by jobs/submit.sh as one job, stopped mid-way and resumed,
`diffmix-ray status/logs/stop`, the project's metrics on Ray's Prometheus endpoint, staging a model on every node, and no credential in any log,
output or job record.

The head runs in its own processes with its own temp dir and ports; this test process never
joins it (everything goes through subprocesses and the job REST API), so the session-wide
`ray_local` of other tests is untouched. Teardown ends exactly the processes of this head (not
`ray stop`, which ends every Ray on the machine, other sessions' included)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.cluster.helpers import processes_of, stop_processes
from tests.paths import REPO
from tests.waiting import free_ports, wait_for

VENV_BIN = Path(sys.executable).parent
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
STAGE_CONFIG = {"prepare": "PrepareConfig", "finetune": "FinetuneConfig", "generate": "GenerateConfig",
                "train-cls": "ClassifyConfig"}

# Fake credentials of the shapes real ones have: they must never show up anywhere.
FAKE_KEY_ID = "AKIAFAKEFAKEFAKE1234"
FAKE_SECRET = "fakeSecretKey/DoNotLeak+9f8e7d6c5b4a"
FAKE_RAY_TOKEN = "fake-ray-token-DoNotLeak-0123456789abcdef"
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_KEY|ACCESS_KEY|SESSION|AUTH", re.I)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|-----BEGIN|ghp_[A-Za-z0-9]{20}|hf_[A-Za-z0-9]{20}")


# ---------------------------------------------------------------------------------------------
# Static checks: launcher configs, KubeRay manifests, Dockerfile, runtime env, job configs
# ---------------------------------------------------------------------------------------------
def _secretish_env(env: dict) -> list[str]:
    return [k for k, v in (env or {}).items() if SECRET_NAME.search(k) or SECRET_VALUE.search(str(v))]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs before it touches the cloud

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head must run no tasks"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 3 and all(t["min_workers"] == 0 for t in gpu_types.values()), "GPU types scale from 0"
    assert any("spot" in n for n in gpu_types) and any("ondemand" in n for n in gpu_types)
    assert config["idle_timeout_minutes"] > 0 and config["docker"]["image"].split(":")[-1]
    assert any("HF_HUB_OFFLINE=1" in c for c in config["setup_commands"])
    for name, t in types.items():  # cloud identity on every node, never keys
        assert "IamInstanceProfile" in t["node_config"] or "serviceAccounts" in t["node_config"], name
    assert not SECRET_VALUE.search(path.read_text())


def _registered_commands() -> set[str]:
    from diffmix_ray.cli import app

    return {c.name or c.callback.__name__ for c in app.registered_commands}


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["autoscalerOptions"]["version"] == "v2", where
    assert spec["authOptions"]["mode"] == "token", where
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, where
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: GPU group needs the toleration"
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1", where
            assert not _secretish_env(env), f"{where}: secret-looking env {_secretish_env(env)}"


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"] and isinstance(doc["spec"], dict)
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(doc["spec"], path.name)
        return
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    m = re.search(r"(?<![/\w-])diffmix-ray ([\w-]+) .*?--config (\S+)", spec["entrypoint"])
    assert m, f"{path.name}: entrypoint must run `diffmix-ray <stage> --config <file>`"
    stage, config = m.groups()
    assert path.name == f"rayjob-{stage}.yaml" and stage in _registered_commands()
    assert (REPO / config).is_file(), f"{path.name} names {config}, which is not in the repo"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not _secretish_env(runtime_env.get("env_vars")), path.name
    _check_cluster_spec(spec["rayClusterSpec"], path.name)


def test_dockerfile_copies_what_exists_and_dockerignore_lets_it_through():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:2\.60\.0-py311-(gpu|cu12\d)$", text, re.M)
    assert re.search(r"^ENV HF_HUB_OFFLINE=1", text, re.M)
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY")]
    assert copies
    for args in copies:
        sources = [a for a in args if not a.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert src.rstrip("/") in allowed, f".dockerignore must re-include {src} (!{src})"


def test_runtime_env_has_no_secrets_and_excludes_heavy_paths(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert not _secretish_env(env["env_vars"]), "runtime_env.yaml env_vars must never carry credentials"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    for must in (".git", ".venv", "outputs", "demo-out", "*.safetensors", "*.parquet"):
        assert must in env["excludes"]
    # What `ray job submit` would upload from this checkout (ignoring .gitignore, to rely on excludes).
    zip_path = tmp_path / "pkg.zip"
    create_package(str(REPO), zip_path, include_gitignore=False, excludes=env["excludes"])
    import zipfile

    names = zipfile.ZipFile(zip_path).namelist()
    assert not [n for n in names if n.startswith((".git/", ".venv/"))]
    assert "jobs/configs/generate.yaml" in names and "diffmix_ray/cli.py" in names
    # the shipped sample models travel with the code that checks them (--model sample on a cluster)
    assert "diffmix_ray/models/sample_weights/sd/unet/diffusion_pytorch_model.safetensors" in names
    assert zip_path.stat().st_size < 20 * 2**20, f"working_dir upload is {zip_path.stat().st_size} bytes"


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIG))
def test_job_config_builds_and_validates(stage):
    from diffmix_ray import config as cfgmod
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.data.prepare import PrepareConfig
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.generate.config import GenerateConfig

    classes = {c.__name__: c for c in (PrepareConfig, FinetuneConfig, GenerateConfig, ClassifyConfig)}
    cfg = cfgmod.build(classes[STAGE_CONFIG[stage]], str(REPO / "jobs" / "configs" / f"{stage}.yaml"), {})
    cfg.validate()


def test_submit_script_parses_and_monitoring_files_are_valid():
    subprocess.run(["bash", "-n", str(REPO / "jobs" / "submit.sh")], check=True)
    assert os.access(REPO / "jobs" / "submit.sh", os.X_OK)
    prom = yaml.safe_load((CLUSTER / "monitoring" / "prometheus.yml").read_text())
    files = prom["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    dash = json.loads((CLUSTER / "monitoring" / "grafana-diffmix.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in ("ray_diffmix_images_generated_total", "ray_diffmix_batch_latency_seconds_bucket",
                 "ray_diffmix_pairs_remaining", "ray_data_output_rows", "ray_node_gpus_utilization"):
        assert name in exprs


# ---------------------------------------------------------------------------------------------
# A real Ray head on loopback, shared by the end-to-end tests of this module
# ---------------------------------------------------------------------------------------------
@dataclass
class Head:
    address: str  # dashboard / job API
    gcs: str
    metrics_url: str
    temp_dir: str
    env: dict  # for clients: CLI subprocesses and jobs' view of the world
    work: Path
    bucket: str
    seen_metrics: dict = field(default_factory=dict)  # metric name -> a sample line, gathered while tests run

    def s3(self):
        import s3fs

        return s3fs.S3FileSystem(key=FAKE_KEY_ID, secret=FAKE_SECRET, skip_instance_cache=True, client_kwargs={
            "endpoint_url": self.env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"})

    def cli(self, *args: str, timeout: float = 120, check: bool = True, env: dict | None = None):
        result = subprocess.run([str(VENV_BIN / "diffmix-ray"), *args], cwd=REPO, env=env or self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"diffmix-ray {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def submit(self, submission_id: str, *entrypoint: str, timeout: float = 300) -> dict:
        """`ray job submit` the way jobs/submit.sh does, wait for the end, return the job's summary."""
        subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--submission-id",
                        submission_id, "--runtime-env", "jobs/runtime_env.yaml", "--entrypoint-num-cpus", "1",
                        "--no-wait", "--", *entrypoint], cwd=REPO, env=self.env, check=True, capture_output=True,
                       text=True, timeout=120)
        self.cli("status", submission_id, "--wait", timeout=timeout, check=False)
        return json.loads(self.cli("status", submission_id, "--json").stdout)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode("utf-8", "replace")


def _watch_metrics(head: Head, stop: threading.Event) -> None:
    """Record every diffmix_* series the head's endpoint exports while the tests run: gauges and
    counters of finished processes are dropped after a while, so one late scrape could miss them."""
    while not stop.is_set():
        try:
            for line in _scrape(head.metrics_url).splitlines():
                if line.startswith("ray_diffmix_"):
                    head.seen_metrics.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], line)
        except OSError:
            pass
        stop.wait(1.0)


@pytest.fixture(scope="module")
def head(s3_server):
    ray_bin = VENV_BIN / "ray"
    temp_dir = tempfile.mkdtemp(prefix="dmx-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs_port, dash_port, metrics_port, *more = free_ports(9)
    gcs = f"127.0.0.1:{gcs_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs find `diffmix-ray` and `ray`
        "RAY_AUTH_MODE": "disabled",  # a throwaway loopback head; real clusters run token auth
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # as in conftest: Ray Train sees each fit's end sooner
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps `ray start` from swapping 127.0.0.1 for the LAN IP
        "RAY_USAGE_STATS_ENABLED": "0",
        "COLUMNS": "200",  # rich tables in `diffmix-ray status` stay one row per job
        "HF_HUB_OFFLINE": "1",
        "DIFFMIX_MODEL_CACHE": os.path.join(temp_dir, "model-cache"),
        # S3 = the loopback moto server, reached with credentials that must never leak anywhere.
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server, "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--num-cpus=6", f"--temp-dir={temp_dir}", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
           f"--metrics-export-port={metrics_port}", "--disable-usage-stats",
           *(f"--{flag}={port}" for flag, port in zip(
               ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "runtime-env-agent-port", "node-manager-port", "object-manager-port"), more))]
    stop = threading.Event()
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        import boto3

        bucket = f"ops-{os.getpid()}-{int(time.time())}"
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=FAKE_KEY_ID,
                     aws_secret_access_key=FAKE_SECRET).create_bucket(Bucket=bucket)
        work = Path(temp_dir) / "work"
        work.mkdir()
        h = Head(address=f"http://127.0.0.1:{dash_port}", gcs=gcs,
                 metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", temp_dir=temp_dir,
                 env=env | {"RAY_ADDRESS": f"http://127.0.0.1:{dash_port}"}, work=work, bucket=f"s3://{bucket}")
        watcher = threading.Thread(target=_watch_metrics, args=(h, stop), daemon=True)
        watcher.start()
        yield h
    finally:
        stop.set()
        stop_processes(processes_of(temp_dir, gcs))  # this head's processes only: other Rays on the machine live on
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(head):
    """3 classes x 6 images: 4 train, 1 val, 1 test each."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import SAMPLE_SUPER_CLASS, write_sample_imagefolder

    raw = write_sample_imagefolder(str(head.work / "raw"), num_classes=3, per_class=6, size=32)
    out = str(head.work / "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class=SAMPLE_SUPER_CLASS, val_fraction=0.17, test_fraction=0.17),
            out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def configs(head, dataset):
    """Stage configs for the jobs (what jobs/configs/*.yaml are on a real cluster)."""
    folder = head.work / "configs"
    folder.mkdir()
    # Synthetic shards go to S3 (moto), as on a cluster: the jobs use the nodes' credentials.
    (folder / "generate.yaml").write_text(yaml.safe_dump(dict(
        dataset=dataset, model="tiny", mode="real-mix", multiplier=1, steps=4, out=f"{head.bucket}/synthetic",
        batch_size=4, rows_per_shard=8)))
    (folder / "train-cls.yaml").write_text(yaml.safe_dump(dict(
        dataset=dataset, synthetic=[f"{head.bucket}/synthetic"], arch="test_resnet", epochs=1, img_size=32,
        batch_size=4, cpus_per_worker=0.5, out=str(head.work / "classifier"))))
    return folder


@pytest.fixture(scope="module")
def generated(head, configs, recipe_stopped):
    """The generate job; the recipe job's first submission (`recipe_stopped`) runs meanwhile."""
    info = head.submit("diffmix-generate-e2e", "diffmix-ray", "generate", "--config", str(configs / "generate.yaml"))
    return info


@pytest.fixture(scope="module")
def classified(head, configs, generated):
    return head.submit("diffmix-train-cls-e2e", "diffmix-ray", "train-cls", "--config", str(configs / "train-cls.yaml"))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_generate_runs_as_a_ray_job(head, generated):
    assert generated["status"] == "SUCCEEDED", head.cli("logs", "diffmix-generate-e2e").stdout[-3000:]
    fs, out = head.s3(), f"{head.bucket[5:]}/synthetic"
    assert fs.exists(f"{out}/_SUCCESS")
    manifest = json.loads(fs.cat(f"{out}/manifest.json"))
    assert manifest["counts"]["generated"] == manifest["counts"]["planned"] == 12  # 3 classes x 4 train x 1
    assert fs.glob(f"{out}/shards/*.parquet")
    logs = head.cli("logs", "diffmix-generate-e2e").stdout
    # The stage says where to watch it and which run it is (runtime.jobs.announce).
    assert f"in Ray job diffmix-generate-e2e: watch {head.address}/#/jobs/diffmix-generate-e2e" in logs
    assert re.search(r"generate run [0-9a-f]{16} in Ray job", logs)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_train_cls_runs_as_a_ray_job(head, classified):
    assert classified["status"] == "SUCCEEDED", head.cli("logs", "diffmix-train-cls-e2e").stdout[-3000:]
    out = head.work / "classifier"
    assert (out / "_SUCCESS").exists() and (out / "metrics.json").exists()
    assert "train-cls run" in head.cli("logs", "diffmix-train-cls-e2e").stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_status_reports_both_jobs(head, generated, classified):
    table = head.cli("status")
    assert "diffmix-generate-e2e" in table.stderr and "diffmix-train-cls-e2e" in table.stderr
    rows = {r["submission_id"]: r for r in json.loads(head.cli("status", "--json").stdout)}
    assert rows["diffmix-generate-e2e"]["status"] == rows["diffmix-train-cls-e2e"]["status"] == "SUCCEEDED"
    one = head.cli("status", "diffmix-train-cls-e2e")
    assert "SUCCEEDED" in one.stderr and f"{head.address}/#/jobs/diffmix-train-cls-e2e" in one.stderr
    missing = head.cli("status", "no-such-job", check=False)
    assert missing.returncode == 2 and "no job with submission id 'no-such-job'" in missing.stderr
    unreachable = head.cli("status", "--address", "http://127.0.0.1:9", check=False)
    assert unreachable.returncode == 2 and "cannot reach the Ray job API at http://127.0.0.1:9" in unreachable.stderr


def _submit_script(head, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "jobs" / "submit.sh"), *args], cwd=REPO, env=head.env, capture_output=True,
                          text=True, timeout=600)


RECIPE_ARGS = ["tiny", "--methods", "da-fusion", "--seeds", "0"]


@pytest.fixture(scope="module")
def recipe_stopped(head):
    """The recipe job's first submission, stopped as soon as it generates, in a thread that starts with
    the module's jobs: the generate and train-cls jobs run beside it (each job mostly waits on its
    processes' start, so together they take little more than either alone). The recipe test reads
    what happened."""
    out = head.work / "tiny-run"
    args = [RECIPE_ARGS[0], "--out", str(out), *RECIPE_ARGS[1:]]
    plan = out / "synthetic" / "da-fusion" / "plan"
    log_path = head.work / "submit-1.log"
    happened: dict = {"out": out, "args": args, "log": log_path}

    def first_submission():
        try:
            with open(log_path, "w") as log:
                first = subprocess.Popen([str(REPO / "jobs" / "submit.sh"), "e2e", *args], cwd=REPO, env=head.env,
                                         stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: first.poll() is not None or plan.is_dir(), timeout=420, what="generation to start")
                happened["ended_before_the_stop"] = first.poll() is not None
                if not happened["ended_before_the_stop"]:
                    happened["stopped"] = head.cli("stop", "diffmix-run-e2e")
                    happened["rc"] = first.wait(timeout=120)
            finally:
                if first.poll() is None:
                    first.kill()
        except BaseException as e:  # noqa: BLE001 - raised by the recipe test
            happened["error"] = e

    thread = threading.Thread(target=first_submission, daemon=True)
    thread.start()
    yield thread, happened
    thread.join(timeout=600)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_a_recipe_runs_as_a_ray_job_stopped_mid_way_and_resumed_by_submitting_again(head, recipe_stopped):
    """jobs/submit.sh submits `diffmix-ray run RECIPE ...` as one Ray job. `diffmix-ray stop JOB` (the job
    API's stop of that one submission on this test's head; nothing else on the machine is touched) while it
    generates: Ray ends the job's driver and its actors; the same command again submits it as -retry2, whose
    `run` skips the finished steps on their stages' completion markers, resumes the cut one, runs the rest
    and writes the report; once more, it skips the SUCCEEDED job. Lean on purpose: DA-Fusion alone (a TI
    bank, per-image generation, own-source replacement: every kind of step), one seed; test_recipes.py
    covers the rest without Ray."""
    from diffmix_ray import storage
    from diffmix_ray.contracts import CONCEPTS_JSON, DATASET_JSON, SUCCESS

    thread, happened = recipe_stopped
    thread.join(timeout=600)
    assert not thread.is_alive(), "the first submission never ended"
    if "error" in happened:
        raise happened["error"]
    out, args = happened["out"], happened["args"]
    said = happened["log"].read_text()
    assert not happened["ended_before_the_stop"], said[-3000:]
    stopped = happened["stopped"]
    assert "stop requested for diffmix-run-e2e" in stopped.stdout + stopped.stderr
    assert happened["rc"] == 1  # submit.sh: the job did not succeed
    assert "submitting diffmix-run-e2e" in said and "did not succeed" in said, said[-3000:]
    assert (out / "banks" / "da-fusion" / CONCEPTS_JSON).exists()
    assert not (out / "synthetic" / "da-fusion" / SUCCESS).exists()

    rerun = _submit_script(head, "E2E", *args)  # the name is lower-cased: the same run
    assert rerun.returncode == 0, rerun.stdout[-6000:] + rerun.stderr[-3000:]
    assert "submitting diffmix-run-e2e-retry2" in rerun.stdout
    first_run, second_run = json.loads((out / "timings.json").read_text())["invocations"]
    assert [s["step"] for s in first_run["steps"]] == ["prepare", "finetune da-fusion"]  # done before the stop
    status = {s["step"]: s["status"] for s in second_run["steps"]}
    assert status == {"prepare": "skipped", "finetune da-fusion": "skipped", "generate da-fusion": "ran",
                      "train-cls da-fusion seed 0": "ran", "report": "ran"}
    assert "steps run: 3, skipped as complete: 2" in rerun.stdout
    for marker in (out / "dataset" / DATASET_JSON, out / "synthetic" / "da-fusion" / SUCCESS,
                   out / "classifiers" / "da-fusion" / "seed-0" / SUCCESS):
        assert marker.exists(), marker
    bank = json.loads((out / "banks" / "da-fusion" / CONCEPTS_JSON).read_text())
    assert bank["mode"] == "ti" and bank["train_config"]["initializer_token"] == "the"
    manifest = storage.read_json(str(out / "synthetic" / "da-fusion" / "manifest.json"))
    assert manifest["config"]["per_image"] == 1 and manifest["counts"]["generated"] == 72  # one per train image
    metrics = json.loads((out / "classifiers" / "da-fusion" / "seed-0" / "metrics.json").read_text())
    assert metrics["synthetic_sampling"] == "own-source" and metrics["p"] == 0.5
    table = (out / "report" / "table.md").read_text()
    assert "## tiny: sample shapes" in table
    assert "| Method | Top-1 (%, last epoch) | Δ vs Real only | Seeds |" in table
    assert "| DA-Fusion |" in table and "| generate da-fusion |" in table
    assert {"table.md", "table.html", "methods.png", "accuracy.png", "contact-da-fusion.png"} <= \
        set(os.listdir(out / "report"))

    again = _submit_script(head, "e2e", *args)
    assert again.returncode == 0 and "diffmix-run-e2e-retry2 already SUCCEEDED: skipping" in again.stdout
    unknown = _submit_script(head, "x", "no-such-recipe", "--out", str(out))
    assert unknown.returncode == 2 and "no recipe named 'no-such-recipe'" in unknown.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_custom_metrics_on_the_prometheus_endpoint(head, generated):
    wanted = {"ray_diffmix_images_generated_total", "ray_diffmix_batch_latency_seconds_bucket",
              "ray_diffmix_pairs_remaining", "ray_diffmix_pairs_planned"}
    deadline = time.time() + 30  # metrics are flushed every few seconds
    while not wanted <= set(head.seen_metrics) and time.time() < deadline:
        time.sleep(1)
    assert wanted <= set(head.seen_metrics), f"exported: {sorted(head.seen_metrics)}"
    total = sum(float(line.rsplit(" ", 1)[1]) for line in _scrape(head.metrics_url).splitlines()
                if line.startswith("ray_diffmix_images_generated_total"))
    assert total >= 12 or "ray_diffmix_images_generated_total" in head.seen_metrics
    # Every project metric the Grafana dashboard plots is one the code exports (failures only
    # appear once a pair fails).
    dash = (CLUSTER / "monitoring" / "grafana-diffmix.json").read_text()
    plotted = set(re.findall(r"ray_diffmix_\w+", dash))
    assert plotted - set(head.seen_metrics) <= {"ray_diffmix_pairs_failed_total", "ray_diffmix_batch_latency_seconds_sum",
                                                "ray_diffmix_batch_latency_seconds_count"}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_stage_model_on_all_nodes(head):
    model = f"{head.bucket}/models/tiny"
    head.cli("model", "make-tiny", model)
    env = head.env | {"RAY_ADDRESS": head.gcs}
    first = head.cli("model", "stage", model, "--all-nodes", env=env)
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["path"].startswith(head.env["DIFFMIX_MODEL_CACHE"])  # one node here
    assert (Path(rows[0]["path"]) / "model_index.json").is_file()
    assert (Path(rows[0]["path"]) / ".diffmix-staged.json").is_file()
    again = [json.loads(line) for line in head.cli("model", "stage", model, "--all-nodes", env=env).stdout.splitlines()]
    assert again == rows  # staged once: a repeat finds it in the node's cache


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_no_secret_in_logs_outputs_or_job_records(head, generated, classified):
    """The credentials reach the jobs only through the nodes' environment (as an instance profile
    would), generate wrote S3 and train-cls read it with them, and they appear nowhere a user or
    the cluster records: job logs, job records (REST), outputs, runtime env, Ray's own logs."""
    secrets = [FAKE_KEY_ID, FAKE_SECRET, FAKE_RAY_TOKEN]
    # A client token is sent, never printed.
    with_token = head.env | {"RAY_AUTH_TOKEN": FAKE_RAY_TOKEN}
    jobs = [r["submission_id"] for r in json.loads(head.cli("status", "--json").stdout)]
    assert {"diffmix-generate-e2e", "diffmix-train-cls-e2e"} <= set(jobs)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # each a CLI process that mostly waits on its start and the job API
        status = {sid: pool.submit(head.cli, "status", sid, "--json", env=with_token) for sid in jobs}
        logs = [pool.submit(head.cli, "logs", sid, env=with_token) for sid in jobs]
        table = pool.submit(head.cli, "status", env=with_token)
        records = {sid: done.result().stdout for sid, done in status.items()}
        records["logs"] = "".join(done.result().stdout for done in logs)
        records["table"] = table.result().stderr
    from ray.job_submission import JobSubmissionClient  # the raw REST record, not our summary of it

    records["rest"] = json.dumps([j.dict() for j in JobSubmissionClient(head.address).list_jobs()], default=str)
    fs, out = head.s3(), f"{head.bucket[5:]}/synthetic"
    for name in ("manifest.json", "_run.json"):
        records[f"s3 {name}"] = fs.cat(f"{out}/{name}").decode()
    for name in ("metrics.json", "_run.json"):
        records[f"classifier {name}"] = (head.work / "classifier" / name).read_text()
    records["runtime_env.yaml"] = (REPO / "jobs" / "runtime_env.yaml").read_text()
    for where, text in records.items():
        for s in secrets:
            assert s not in text, f"a credential leaked into {where}"
    # Every file Ray wrote under the session's log directory: raylet, GCS, dashboard, agents, job drivers.
    logs_dir = Path(head.temp_dir) / "session_latest" / "logs"
    scanned = 0
    for path in logs_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            for s in secrets:
                assert s.encode() not in data, f"a credential leaked into {path}"
    assert scanned > 10
