"""Autoscaling from zero GPU nodes, on Ray's fake multi-node provider (one machine; its "GPU" nodes
are raylets that advertise a GPU): autoscaler v1 and v2, the shape of cluster/aws.yaml (a head that
runs no GPU work, a GPU worker type with min_workers 0).

  * `generate` without --gpus-per-actor chooses 1 GPU per actor, the autoscaler adds a GPU node, the
    run starts there, and the idle nodes go afterwards (v1 and v2);
  * with v1 the run finishes there, and the actor pool (--min-actors 1 --max-actors 4) grows onto a
    second GPU node as it arrives (how the pool grows is Ray Data's, the same on either autoscaler);
  * the fake GPU nodes have no CUDA. v1's cluster runs with DIFFMIX_GPU_WITHOUT_CUDA=cpu, which lets
    them run the work on their CPU; v2's does not, and its run fails in one line that names the GPU node
    its autoscaler added (a node that advertises a GPU without CUDA, as a misconfigured image would);
  * an unsatisfiable GPU request is an error naming the flag, in bounded time.

Both autoscalers run at once, one head each (`runs`); the tests read what their runs did."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time

import pytest

from diffmix_ray.contracts import MANIFEST_JSON, SUCCESS
from diffmix_ray.runtime.nodes import GPU_WITHOUT_CUDA_ENV

from tests.cluster.helpers import actor_nodes, cli, fake_autoscaling_head, global_state, gpu_nodes, one_line, record
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

GPU_TYPE = {"gpu": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 200_000_000}, "node_config": {},
                    "min_workers": 0, "max_workers": 2}}
TRANSLATOR = "MapBatches(Translator)"


VERSIONS = ("v1", "v2")
# autoscaler -> (--multiplier, --max-actors): the pool's growth onto a second GPU node is tested on v1.
POOL_RUN = {"v1": (3, 4), "v2": (1, 1)}
# autoscaler -> the environment of its nodes: v1's run on the fake GPU nodes' CPUs; v2's meets their
# missing CUDA.
NODE_ENV = {"v1": {GPU_WITHOUT_CUDA_ENV: "cpu"}, "v2": {}}


def _generate(fake, dataset: str, out: str, *extra: str, multiplier: int = 3):
    return cli(fake.env, "generate", "--dataset", dataset, "--out", out, "--model", "tiny", "--mode", "real-mix",
               "--multiplier", str(multiplier), "--steps", "4", "--batch-size", "4", "--rows-per-shard", "8", *extra)


def _scale_from_zero(fake, dataset: str, out: str) -> dict:
    """generate on the GPU default from zero GPU nodes; what the cluster did meanwhile and after."""
    state = global_state(fake.gcs)
    had_gpu_nodes = bool(gpu_nodes(state))
    seen: dict = {"max_gpu_nodes": 0}
    stop = threading.Event()

    def watch():  # when GPU nodes come, how many at most
        while not stop.is_set():
            n = len(gpu_nodes(state))
            if n and "first_gpu_node_s" not in seen:
                seen["first_gpu_node_s"] = round(time.monotonic() - started, 1)
            seen["max_gpu_nodes"] = max(seen["max_gpu_nodes"], n)
            stop.wait(0.2)

    multiplier, max_actors = POOL_RUN[fake.version]
    started = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = _generate(fake, dataset, out, "--min-actors", "1", "--max-actors", str(max_actors),
                           multiplier=multiplier)
    finally:
        stop.set()
        watcher.join()
    run = {"had_gpu_nodes": had_gpu_nodes, "result": result, "seen": seen, "max_actors": max_actors,
           "run_s": round(time.monotonic() - started, 1), "ran_on": actor_nodes(state, TRANSLATOR),
           "gpu_node_ids": {n["NodeID"] for n in state.node_table() if n.get("Resources", {}).get("GPU", 0) > 0},
           "monitor_log": fake.monitor_log}
    if result.returncode in (0, 2):
        # Idle GPU nodes go once the run is over (idle_timeout_minutes: 0.1 here, 10 in cluster/aws.yaml).
        ended = time.monotonic()
        wait_for(lambda: not gpu_nodes(state), timeout=120, what="the idle GPU nodes to be removed")
        run["idle_nodes_gone_s"] = round(time.monotonic() - ended, 1)
    return run


def _unsatisfiable(fake, dataset: str, out: str) -> dict:
    """No node type has 2 GPUs: v2 calls the request infeasible, v1 starts nothing for it."""
    started = time.monotonic()
    result = _generate(fake, dataset, out, "--gpus-per-actor", "2")
    return {"result": result, "error_after_s": round(time.monotonic() - started, 1)}


@pytest.fixture(scope="module")
def runs(sample_dataset, tmp_path_factory) -> dict:
    """Both autoscalers' runs at once, each on its own head: the scale-from-zero run, then (on the
    same head, its GPU nodes gone) the unsatisfiable request. Each mostly waits on its autoscaler
    and its nodes' start, so together they take little more than the longer one alone. A step that
    failed is kept as its exception, raised by the test that reads it."""
    results: dict = {v: {} for v in VERSIONS}
    starting = threading.Lock()  # one `ray start` at a time: its free ports are picked, then bound

    def run(version: str) -> None:
        folder = tmp_path_factory.mktemp(f"autoscale-{version}")
        try:
            with contextlib.ExitStack() as stack:
                with starting:
                    fake = stack.enter_context(
                        fake_autoscaling_head(version, GPU_TYPE, node_env=NODE_ENV[version]))
                for step, scenario in (("scale", _scale_from_zero), ("unsatisfiable", _unsatisfiable)):
                    try:
                        results[version][step] = scenario(fake, sample_dataset, str(folder / step))
                    except BaseException as e:  # noqa: BLE001 - raised by the test of this step
                        results[version][step] = e
        except BaseException as e:  # noqa: BLE001 - the head did not start: both steps report it
            results[version].setdefault("scale", e)
            results[version].setdefault("unsatisfiable", e)

    threads = [threading.Thread(target=run, args=(v,), daemon=True) for v in VERSIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=540)
    return results


def _step(runs: dict, version: str, step: str) -> dict:
    got = runs[version].get(step)
    assert got is not None, f"{version}: the {step} run never ended"
    if isinstance(got, BaseException):
        raise got
    return got


def _scaled_from_zero(runs: dict, version: str) -> dict:
    """The scale run of this autoscaler, checked as far as both share: no GPU node at first, the GPU
    default chose 1 GPU per actor because the autoscaler adds a GPU node, which it did, and the
    translation actors ran there and nowhere else; the idle GPU nodes went after the run."""
    run = _step(runs, version, "scale")
    assert not run["had_gpu_nodes"], "the cluster must start with no GPU node"
    said = one_line(run["result"])
    print("\n".join(l for l in (run["result"].stdout + run["result"].stderr).splitlines()
                    if "autoscaler +" not in l)[:6000])
    assert f"generate: 1 GPU per actor (the Ray cluster: its autoscaler ({version}) is adding a GPU node" in said
    assert "Adding 1 node(s) of type gpu" in run["monitor_log"] or "Adding 2 node(s) of type gpu" in run["monitor_log"]
    assert run["ran_on"] and run["ran_on"] <= run["gpu_node_ids"], run  # the head has no GPU
    assert "idle_nodes_gone_s" in run, said[-3000:]  # the idle GPU nodes were removed after the run
    return run


def test_gpu_default_scales_from_zero_gpu_nodes_and_back_and_the_pool_grows(runs):
    """v1: the run finishes on the GPU nodes it added, the actor pool growing onto the second."""
    run = _scaled_from_zero(runs, "v1")
    result, seen = run["result"], run["seen"]
    assert result.returncode == 0, one_line(result)[-3000:]
    out = result.args[result.args.index("--out") + 1]
    assert os.path.exists(os.path.join(out, SUCCESS))
    with open(os.path.join(out, MANIFEST_JSON)) as f:
        manifest = json.load(f)
    assert manifest["resolved"]["gpus_per_actor"]["value"] == 1.0
    assert manifest["counts"]["missing"] == 0

    # The pool grew onto the GPU nodes the autoscaler added (its decisions are in its log), one actor
    # per node up to --max-actors or the type's max_workers.
    grown_to = min(run["max_actors"], GPU_TYPE["gpu"]["max_workers"])
    assert seen["max_gpu_nodes"] >= grown_to and len(run["ran_on"]) == grown_to, (seen, run["ran_on"])
    record("autoscale-v1", {"first_gpu_node_s": seen.get("first_gpu_node_s"), "gpu_nodes": seen["max_gpu_nodes"],
                            "run_s": run["run_s"], "idle_nodes_gone_s": run["idle_nodes_gone_s"]})


def test_gpu_default_scales_from_zero_and_a_gpu_node_without_cuda_fails_the_run_in_one_line_naming_it(runs):
    """v2: the translation actor starts on the GPU node the autoscaler added, which has no CUDA (and no
    DIFFMIX_GPU_WITHOUT_CUDA): the run fails with one line naming that node and the fix, no traceback."""
    run = _scaled_from_zero(runs, "v2")
    result = run["result"]
    said = one_line(result)
    assert result.returncode == 2, said[-3000:]
    error = said[said.rindex("error: "):]  # the CLI's last words (Ray may log an "error: " line before them)
    named = re.match(r"error: node 127\.0\.0\.1 \(id (\w+)\) advertises GPUs to Ray \(Ray assigned GPU 0\) but torch",
                     error)
    assert named and named.group(1) in run["ran_on"], (error, run["ran_on"])  # a GPU node the autoscaler added
    assert "sees no CUDA device there" in error and "--gpus-per-actor 0" in error and "Traceback" not in error
    record("autoscale-v2", {"first_gpu_node_s": run["seen"].get("first_gpu_node_s"),
                            "gpu_nodes": run["seen"]["max_gpu_nodes"], "failed_after_s": run["run_s"],
                            "idle_nodes_gone_s": run["idle_nodes_gone_s"]})


@pytest.mark.parametrize("version", VERSIONS)
def test_an_unsatisfiable_gpu_request_is_an_error_in_bounded_time(runs, version):
    """No node type has 2 GPUs: v2 calls the request infeasible, v1 starts nothing for it."""
    run = _step(runs, version, "unsatisfiable")
    said = one_line(run["result"])
    assert run["result"].returncode == 2, said[-3000:]
    assert "--gpus-per-actor 2: this cluster has no node type with 2 GPU(s) it can start" in said
    assert "pass --gpus-per-actor 0 to run on CPU" in said and "Traceback" not in said
    assert ("calls the GPU request infeasible" if version == "v2"
            else "started no GPU node: it has no GPU node type, or it is at max_workers") in said
    record(f"unsatisfiable-{version}", {"error_after_s": run["error_after_s"]})
