"""Node deaths, node-local storage and GPU nodes without CUDA, on several raylets on one machine
(`ray.cluster_utils.Cluster`, as Ray's own chaos tests do): a head that runs no work (CPU 0, as
cluster/aws.yaml's) and two worker nodes. Each stage runs as its own driver process joined to it.

  * a worker node killed in the middle of `generate` and of `score`: the run completes (a rerun is
    allowed when Ray Data gives up) with every pair exactly once;
  * in the middle of `finetune` and `train-cls`: Ray Train restores from the last checkpoint
    (FailureConfig), and the result is the one of the same config run without interruption, bit-exact on
    CPU (finetune: its step loop run straight through in the test's process; train-cls: `shapes_fit`);
  * a local path that is not the same folder on every node refuses the run.

(A node that advertises a GPU without CUDA is met on the fake autoscaler's GPU nodes:
test_autoscaling.py.)

After each kill a fresh node joins, as an autoscaler would replace a preempted one."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from diffmix_ray.contracts import LEARNED_EMBEDS, LORA_WEIGHTS, SCORES_DIR, SHARDS_DIR, SUCCESS
from diffmix_ray.runtime.shared_paths import TEST_ROOT_ENV

from tests.cluster.helpers import REPO, VENV_BIN, client_env, one_line, record
from tests.waiting import wait_for
from tests.fixtures import SHAPES_FIT, straight_finetune

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

WORKER_CPUS = 2
GEN = ["--model", "tiny", "--mode", "real-mix", "--multiplier", "3", "--steps", "4", "--batch-size", "4",
       "--rows-per-shard", "8", "--max-actors", "2", "--gpus-per-actor", "0"]


@dataclass
class Nodes:
    cluster: object  # ray.cluster_utils.Cluster
    env: dict  # for driver processes: RAY_ADDRESS = the head
    temp_dir: str

    @property
    def state(self):
        return self.cluster.global_state

    def node_of_actor(self, class_part: str):
        """A worker node (Node object) where an alive actor of that class runs."""
        for actor in self.state.actor_table(None).values():
            if class_part in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE":
                for node in self.cluster.worker_nodes:
                    if node.node_id == actor["Address"]["NodeID"]:
                        return node
        return None

    def add_worker(self, **extra):
        return self.cluster.add_node(num_cpus=WORKER_CPUS, node_ip_address="127.0.0.1", **extra)

    def kill_node_of(self, class_part: str, replace: bool = True) -> str:
        """Kill (no grace) the node running an actor of this class, then add a fresh one. Adding a node
        starts a raylet, which sets a SIGTERM handler: only the main thread may (`replace=False` from
        another thread, and `add_worker()` afterwards from the main one)."""
        node = wait_for(lambda: self.node_of_actor(class_part), timeout=60, what=f"an alive {class_part} actor")
        self.cluster.remove_node(node, allow_graceful=False)
        if replace:
            self.add_worker()
        return node.node_id


@pytest.fixture(scope="module")
def nodes():
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="dmx19n-", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster writes its address file under it, not into /tmp/ray
    os.makedirs(os.path.join(temp_dir, "ray"))
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
            num_cpus=0, node_ip_address="127.0.0.1", temp_dir=temp_dir, include_dashboard=False,
            object_store_memory=150 * 2**20,
            # A killed node is declared dead after ~3 s of missed health checks, not Ray's ~15-30 s: what the
            # tests wait for is the stages' recovery, not the detector.
            _system_config={"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                            "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}))
        n = Nodes(cluster, client_env({"RAY_ADDRESS": cluster.address, "RAY_TMPDIR": temp_dir}), temp_dir)
        for _ in range(2):
            n.add_worker()
        yield n
        cluster.shutdown()
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start(nodes: Nodes, args: list[str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([str(VENV_BIN / "diffmix-ray"), *args], cwd=REPO, env=nodes.env, stdout=f,
                                stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: str, timeout: float = 300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    with open(log) as f:
        return rc, f.read()


def _files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.parquet")))


def _rerun_until_done(nodes: Nodes, args: list[str], rc: int, text: str, log: str) -> int:
    """Ray Data may give up on a run whose node died (the docs allow a rerun): the same command
    resumes it. Returns the reruns needed (at most one)."""
    if rc == 0:
        return 0
    rc, again = _finish(_start(nodes, args, log), log)
    assert rc == 0, f"the rerun failed too:\n{text[-3000:]}\n---\n{again[-3000:]}"
    return 1


def _assert_each_once(folder: str, key: str, expected: set[str]) -> None:
    import pyarrow.parquet as pq

    ids = [i for f in _files(folder) for i in pq.read_table(f, columns=[key]).column(key).to_pylist()]
    assert len(ids) == len(set(ids)), "a pair is there twice"
    assert set(ids) == expected


def _plan_ids(out: str) -> set[str]:
    import pyarrow.parquet as pq

    return {i for f in _files(os.path.join(out, "plan")) for i in pq.read_table(f).column("pair_id").to_pylist()}


# ---------------------------------------------------------------------------------------------
# Ray Data stages
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(nodes, sample_dataset, tmp_path_factory):
    """generate, with the node of one of its two translation actors killed after the first shard."""
    out = str(tmp_path_factory.mktemp("gen") / "out")
    args = ["generate", "--dataset", sample_dataset, "--out", out, *GEN]
    log = str(tmp_path_factory.getbasetemp() / "generate.log")
    started = time.monotonic()
    proc = _start(nodes, args, log)
    wait_for(lambda: proc.poll() is not None or len(_files(os.path.join(out, SHARDS_DIR))) >= 1, timeout=240,
             what="the first shard")
    assert proc.poll() is None, "generate ended before a node could be killed"
    rows_before = len(_files(os.path.join(out, SHARDS_DIR)))
    killed = nodes.kill_node_of("MapBatches(Translator)")
    rc, text = _finish(proc, log)
    reruns = _rerun_until_done(nodes, args, rc, text, log)
    record("node-death-generate", {"shards_before_kill": rows_before, "reruns": reruns,
                                   "seconds": round(time.monotonic() - started, 1)})
    return out, killed, reruns


def test_generate_survives_a_node_death_with_every_pair_once(generated):
    out, _, _ = generated
    assert os.path.exists(os.path.join(out, SUCCESS))
    _assert_each_once(os.path.join(out, SHARDS_DIR), "pair_id", _plan_ids(out))


def test_score_survives_a_node_death_with_every_pair_once(nodes, generated, tmp_path):
    out, _, _ = generated
    scores = os.path.join(out, SCORES_DIR, "default")
    args = ["score", "--synthetic", out, "--clip", "tiny", "--batch-size", "4", "--rows-per-file", "8",
            "--gpus-per-actor", "0", "--max-actors", "2"]
    log = str(tmp_path / "score.log")
    started = time.monotonic()
    proc = _start(nodes, args, log)
    wait_for(lambda: proc.poll() is not None or len(_files(scores)) >= 1, timeout=240, what="the first score file")
    assert proc.poll() is None, "score ended before a node could be killed"
    nodes.kill_node_of("MapBatches(Scorer)")
    rc, text = _finish(proc, log)
    reruns = _rerun_until_done(nodes, args, rc, text, log)
    record("node-death-score", {"reruns": reruns, "seconds": round(time.monotonic() - started, 1)})
    assert os.path.exists(os.path.join(scores, SUCCESS))
    _assert_each_once(scores, "pair_id", _plan_ids(out))


# ---------------------------------------------------------------------------------------------
# Ray Train stages: FailureConfig restores from the last checkpoint on the nodes left
# ---------------------------------------------------------------------------------------------
def _driver(nodes: Nodes, code: str, log: str) -> subprocess.Popen:
    """A driver process running `code` (Python) joined to the cluster."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=nodes.env, stdout=f,
                                stderr=subprocess.STDOUT)


def _checkpoints(out: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "train", "*", pattern)))


# Two checkpoints, at steps 4 and 8: the cluster run's worker holds before step 5 (a test hook) until the
# test has seen Ray Train register the first and killed its node, so the run resumes from step 4 whatever
# the machine's load.
FT_CKPT = 4
FINETUNE_KW = dict(model="tiny", max_steps=2 * FT_CKPT, batch_size=2, checkpoint_every=FT_CKPT, log_every=2 * FT_CKPT,
                   lr=1e-2, ti_lr=5e-2, seed=0, workers=1, cpus_per_worker=1.0, gpus_per_worker=0)
# The shared fit's config (its uninterrupted run is conftest's `shapes_fit`) with a checkpoint every epoch;
# the cluster run's worker holds before epoch 1 (a test hook) until the test has seen Ray Train register
# epoch 0's checkpoint and killed its node: the run restores into epochs 1-4 whatever the machine's load.
TRAIN_CLS_KW = dict(**SHAPES_FIT, workers=1, gpus_per_worker=0, checkpoint_every=1)
CLS_HELD_AT = 1


def _python_driver(stage: str, config_class: str, run: str, **kw) -> str:
    return (f"from diffmix_ray.{stage}.config import {config_class}\nfrom diffmix_ray.{stage}.run import {run}\n"
            f"{run}({config_class}(**{kw!r}))\n")


def _registered_checkpoint(out: str) -> str | None:
    """The folder of the latest checkpoint in Ray Train's checkpoint manager snapshot, if any."""
    for snapshot in glob.glob(os.path.join(out, "train", "*", "checkpoint_manager_snapshot.json")):
        with contextlib.suppress(OSError, ValueError):
            with open(snapshot) as f:
                latest = json.load(f).get("latest_checkpoint_result")
            if latest:
                return os.path.join(os.path.dirname(snapshot), latest["checkpoint_dir_name"])
    return None


def test_finetune_restores_after_a_node_death_and_ends_bit_exact(nodes, sample_dataset, tmp_path):
    """Restored from the registered checkpoint at step 4 on the nodes left, each step once, and the
    weights of the same config run straight through (the stage's own step loop in this process,
    meanwhile), bit for bit: the steps draw their noise per step, not per attempt."""
    import torch
    from safetensors.torch import load_file

    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.finetune.loop import CKPT_WEIGHTS

    out = str(tmp_path / "bank")
    log = str(tmp_path / "finetune.log")
    started = time.monotonic()
    proc = _driver(nodes, _python_driver("finetune", "FinetuneConfig", "run_finetune", **FINETUNE_KW,
                                         dataset=sample_dataset, out=out, _hold_at_step=FT_CKPT + 1), log)
    straight = straight_finetune(FinetuneConfig(**FINETUNE_KW, dataset=sample_dataset, out=str(tmp_path / "unused")))
    registered = wait_for(lambda: proc.poll() is not None or _registered_checkpoint(out), timeout=240,
                          what="a finetune checkpoint Ray Train has registered")
    assert proc.poll() is None, "finetune ended before a node could be killed"
    assert registered.endswith(f"checkpoint_step={FT_CKPT:08d}"), registered
    nodes.kill_node_of("RayTrainWorker")
    rc, text = _finish(proc, log)
    assert rc == 0, text[-4000:]
    (last,) = _checkpoints(out, f"checkpoint_step={2 * FT_CKPT:08d}")
    with open(os.path.join(last, "progress-rank0.json")) as f:
        progress = json.load(f)
    assert progress["resumed_at"] == [FT_CKPT], (progress, text[-3000:])  # from the first checkpoint
    assert progress["step_ranges"] == [[1, 2 * FT_CKPT]]  # every step once, in order
    restored = load_file(os.path.join(last, CKPT_WEIGHTS))
    assert restored.keys() == straight.keys()
    assert all(torch.equal(restored[k], straight[k]) for k in straight), "the weights differ from a straight run's"
    assert os.path.exists(os.path.join(out, LORA_WEIGHTS)) and os.path.exists(os.path.join(out, LEARNED_EMBEDS))
    record("node-death-finetune", {"resumed_at_step": FT_CKPT, "seconds": round(time.monotonic() - started, 1)})


def test_train_cls_restores_after_a_node_death(nodes, shapes, request, tmp_path):
    """Restored from the last registered checkpoint on the nodes left, each epoch once, and the result of
    the same config's uninterrupted run (`shapes_fit`, on the session's private Ray), bit for bit: each
    sample's augmentation is drawn from its place in the run, not from the process that decodes it.
    When no earlier test has made `shapes_fit`, it is made here while the cluster run goes on (each
    uses one of the machine's cores), and a helper thread does the kill."""
    import threading

    import torch

    from diffmix_ray.classify.loop import CKPT_FILE

    out = str(tmp_path / "cls")
    log = str(tmp_path / "train-cls.log")
    started = time.monotonic()
    proc = _driver(nodes, _python_driver("classify", "ClassifyConfig", "run_classify", **TRAIN_CLS_KW, dataset=shapes,
                                         out=out, _hold_at_epoch=CLS_HELD_AT), log)
    killer: dict = {}

    def kill_after_a_registered_checkpoint():
        try:
            registered = wait_for(lambda: proc.poll() is not None or _registered_checkpoint(out), timeout=240,
                                  what="a train-cls checkpoint Ray Train has registered")
            assert proc.poll() is None, "train-cls ended before a node could be killed"
            # What the restore must bring back: the checkpoint of the epochs before the worker's hold.
            killer["saved"] = torch.load(os.path.join(registered, CKPT_FILE), map_location="cpu",
                                         weights_only=False)["history"]
            nodes.kill_node_of("RayTrainWorker", replace=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            killer["error"] = e

    thread = threading.Thread(target=kill_after_a_registered_checkpoint, daemon=True)
    thread.start()
    reference = request.getfixturevalue("shapes_fit")[1]  # meanwhile, or made earlier
    uninterrupted = reference["summary"]
    thread.join(timeout=300)
    assert not thread.is_alive(), "the kill never came"
    if "error" in killer:
        raise killer["error"]
    nodes.add_worker()  # the replacement, as an autoscaler would add it
    saved = killer["saved"]
    assert len(saved) == CLS_HELD_AT, saved  # the death came with epochs left to restore into
    rc, text = _finish(proc, log)
    assert rc == 0, text[-4000:]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(TRAIN_CLS_KW["epochs"])), text[-3000:]  # each once
    # Restored, not retrained: the epochs before the death keep their records, measured times included (a
    # recomputation would not reproduce them to the last digit). `test` is added at the end to the selected epoch.
    final = [{k: v for k, v in e.items() if k != "test"} for e in metrics["epochs"][:len(saved)]]
    assert final == json.loads(json.dumps(saved)), "the epochs before the death were redone"
    killed_s = round(time.monotonic() - started, 1)

    # The same run as the uninterrupted one (which scores test every epoch, which trains nothing): each
    # epoch's loss and validation, the selection and its test score, to the last digit.
    def learned(run: dict) -> list[dict]:
        return [{k: e[k] for k in ("epoch", "train_loss", "val", "lr", "steps")} for e in run["epochs"]]

    assert learned(metrics) == learned(reference)
    mine = metrics["summary"]
    assert (mine["selected_epoch"], mine["test_top1"]) == (uninterrupted["selected_epoch"], uninterrupted["test_top1"])
    assert mine["test_top1"] >= 0.75, mine
    record("node-death-train-cls", {"epochs_restored": len(saved), "test_top1": mine["test_top1"],
                                    "uninterrupted_test_top1": uninterrupted["test_top1"], "seconds": killed_s})


# ---------------------------------------------------------------------------------------------
# Storage every node can see
# ---------------------------------------------------------------------------------------------
def test_a_local_path_a_node_does_not_see_refuses_the_run(nodes, sample_dataset, tmp_path):
    """A third node whose disk is its own (tests: DIFFMIX_TEST_NODE_ROOT) sees neither the dataset nor
    the marker the driver writes into --out: refused before any work, naming the node and the fix."""
    own_disk = str(tmp_path / "other-disk")
    os.makedirs(own_disk)
    node = nodes.add_worker(env_vars={TEST_ROOT_ENV: own_disk})
    try:
        out = str(tmp_path / "out")
        result = subprocess.run([str(VENV_BIN / "diffmix-ray"), "generate", "--dataset", sample_dataset, "--out", out,
                                 *GEN], cwd=REPO, env=nodes.env, capture_output=True, text=True, timeout=240)
        said = one_line(result)
        assert result.returncode == 2, said[-3000:]
        assert (f"generate: this Ray cluster has 3 nodes and every local path of a run must be the same folder on "
                f"each, but node 127.0.0.1 (id {node.node_id}) sees nothing at --dataset {sample_dataset}") in said
        assert "(and 1 more)" in said  # the --out marker it cannot see either
        assert "Use s3:// paths, or a shared mount" in said
        assert not _files(os.path.join(out, SHARDS_DIR))  # nothing was generated
        assert not glob.glob(os.path.join(out, ".diffmix-visible-*"))  # the marker is cleaned up
    finally:
        nodes.cluster.remove_node(node)

