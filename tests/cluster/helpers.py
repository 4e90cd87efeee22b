"""Multi-node Ray on one machine for the `cluster` tests: a `ray start` head with Ray's fake
multi-node autoscaler (v1 or v2), and what both kinds of test need around it (stopping exactly the
processes a test started, reading the cluster's tables without connecting a driver, running a stage
as its own driver process).

A test process never connects to these clusters itself: the session's private Ray (`ray_local`)
may live in the same process, and a process joins one Ray at a time. Stages run as CLI subprocesses
with RAY_ADDRESS set, as they do under `ray job submit`. Nothing here runs `ray stop`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.paths import REPO
from tests.waiting import free_ports

VENV_BIN = Path(sys.executable).parent
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # ray.autoscaler._private.fake_multi_node.node_provider
def processes_of(temp_dir: str, gcs: str):
    """Every process of a cluster: those whose command line names its temp dir or GCS address (head
    daemons, the monitor, fake nodes' raylets) and all their descendants (workers, agents)."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in a or gcs in a for a in (p.info["cmdline"] or [])):
                roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(procs) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=2)  # what has not ended by then is killed
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def client_env(extra: dict | None = None) -> dict:
    """The environment of a process that joins a test cluster: loopback, no auth, no AWS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # as in conftest: Ray Train sees ends and deaths sooner
                "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200", "DIFFMIX_RAY_DASHBOARD": "0"})
    env.update(extra or {})
    return env


def global_state(gcs: str):
    """Ray's GCS tables (nodes, actors) read without ray.init."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(gcs, None, allow_cluster_id_nil=True,
                                                           fetch_cluster_id_if_nil=False))
    return state


def alive_nodes(state) -> list[dict]:
    return [n for n in state.node_table() if n.get("Alive")]


def gpu_nodes(state) -> list[dict]:
    return [n for n in alive_nodes(state) if n.get("Resources", {}).get("GPU", 0) > 0]


def actor_nodes(state, class_part: str) -> set[str]:
    """Node ids of every actor (alive or dead) whose class name contains `class_part`."""
    return {a["Address"]["NodeID"] for a in state.actor_table(None).values()
            if class_part in a.get("ActorClassName", "") and a.get("Address", {}).get("NodeID")}


def cli(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "diffmix-ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())


# ---------------------------------------------------------------------------------------------
# A head with Ray's fake multi-node autoscaler
# ---------------------------------------------------------------------------------------------
@dataclass
class FakeCluster:
    gcs: str
    temp_dir: str
    version: str  # "v1" | "v2"
    env: dict  # for stage subprocesses: RAY_ADDRESS = this head

    @property
    def monitor_log(self) -> str:
        path = Path(self.temp_dir) / "session_latest" / "logs" / "monitor.log"
        return path.read_text(errors="replace") if path.exists() else ""


def fake_config(gcs_port: int, worker_types: dict, head_cpus: int, idle_minutes: float) -> dict:
    """An autoscaling config for Ray's fake provider. `external` names the same provider class as
    `fake_multinode` does; the v2 config reader needs defaults for a built-in type from a YAML that
    the Ray 2.60 wheel does not ship (fake_multi_node/example.yaml), and an external provider has none."""
    return {
        "cluster_name": "diffmix-test", "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}", "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **worker_types},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_minutes,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": []}


@contextlib.contextmanager
def fake_autoscaling_head(version: str, worker_types: dict, head_cpus: int = 2, idle_minutes: float = 0.1,
                          node_env: dict | None = None, update_interval_s: int | None = 1):
    """`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` on loopback, autoscaler v1 or
    v2, updating every `update_interval_s` (1 s as in Ray's own fake-cluster tests; None: Ray's 5 s).
    `node_env` reaches every process of every node (the fake nodes are started by the monitor)."""
    temp_dir = tempfile.mkdtemp(prefix="dmx19-", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
    gcs_port, *more = free_ports(7)
    gcs = f"127.0.0.1:{gcs_port}"
    config = os.path.join(temp_dir, "autoscaling.yaml")
    with open(config, "w", encoding="utf-8") as f:
        yaml.safe_dump(fake_config(gcs_port, worker_types, head_cpus, idle_minutes), f)
    env = client_env({"RAY_FAKE_CLUSTER": "1", "RAY_TMPDIR": temp_dir, **(node_env or {})})
    if update_interval_s is not None:
        env["AUTOSCALER_UPDATE_INTERVAL_S"] = str(update_interval_s)
    if version == "v2":
        env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID})
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           f"--num-cpus={head_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", f"--autoscaling-config={config}",
           "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=200000000",
           *(f"--{flag}={port}" for flag, port in zip(
               ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "runtime-env-agent-port", "node-manager-port", "object-manager-port"), more))]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield FakeCluster(gcs, temp_dir, version,
                          client_env({"RAY_ADDRESS": gcs, "RAY_TMPDIR": temp_dir, **(node_env or {})}))
    finally:
        stop_processes(processes_of(temp_dir, gcs))
        shutil.rmtree(temp_dir, ignore_errors=True)


def record(name: str, figures: dict) -> None:
    """Measured figures of a cluster test, printed (pytest -s shows them) and kept for the docs."""
    line = json.dumps({"test": name, **figures})
    print(line)
    path = os.environ.get("DIFFMIX_CLUSTER_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
