"""Can this Ray cluster run GPU work: now, once its autoscaler adds a node, or never?

A GPU pool that scales from zero has no GPU node until work asks for one, so "GPUs in the cluster"
cannot decide the GPU default. Open-source Ray 2.60 publishes no list of the node types its
autoscaler can add that every deployment fills in: the GCS key Ray Data and Ray Train read
(`get_cluster_config`) is written by no autoscaler of this release (a later v2 autoscaler writes
it; it is read first, guarded). So the autoscaler is asked the way work asks it: a probe task that
needs GPUs and no CPU, and what the autoscaler then reports in the GCS (what `ray status` reads):

  v1 (monitor.py: `ray start --autoscaling-config`, KubeRay's v1)  its status, every update: the
       demand shapes it saw, the resources of the launches it queued;
  v2 (the launcher's default since Ray 2.50, KubeRay's v2)         its autoscaling state: requests
       it calls infeasible, instances it is launching.

The verdict (`judge`, pure, unit-tested): GPUs alive now; a GPU node launching (the stage goes on
and its own demand keeps the node coming); no way to add nodes at all (a private `ray.init`, or
`ray start` by hand, whose monitor runs a read-only provider: answered from the alive nodes alone);
or a GPU request the autoscaler will not serve: v2 calls it infeasible (no node type holds it, or
max_workers allows no more nodes), v1 - which says no such thing - saw it for a few updates and
queued nothing. The last is an error in bounded time, instead of Ray's endless "infeasible" warning."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

ALIVE, LAUNCHING, CONFIGURED, NONE, INFEASIBLE, STUCK, WAIT = (
    "alive", "launching", "configured", "none", "infeasible", "stuck", "wait")
CAN = (ALIVE, LAUNCHING, CONFIGURED)  # verdicts under which GPU work will run
# Autoscaler updates the demand must have been seen for before "it adds nothing" is believed; Ray's
# update interval is 5 s (AUTOSCALER_UPDATE_INTERVAL_S), so about 15-20 s.
UPDATES_TO_WAIT = 3
# A joined cluster whose autoscaler has not reported yet (a head that just started) gets this long.
FIRST_REPORT_S = 15.0
# The whole question is bounded: an autoscaler that stops reporting does not hang the stage.
DECIDE_S = 120.0
# How long a CUDA check on a GPU node that is up may wait for a free GPU.
CHECK_S = 15.0
_READONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")  # ray.autoscaler._private.util.format_readonly_node_type


@dataclass(frozen=True)
class Look:
    """One look at the cluster and its autoscaler, for a demand of `gpus` GPUs on one node."""

    gpus_alive: float = 0.0  # most GPUs on one alive node
    kind: str = "none"  # "v1" | "v2" | "readonly" (an autoscaler that adds nothing) | "none" (not reported yet)
    version: float = 0.0  # changes with every autoscaler report (v1: its time stamp; v2: its state version)
    demand_seen: bool = False  # a GPU demand that fits the probe is in what the autoscaler reads
    launching_gpus: bool = False  # v1: launches pending whose resources include GPUs
    launching_any: bool = False  # v2: instances requested or starting (v2 names their type, not resources)
    infeasible: bool = False  # v2: no node type can hold a GPU request, or none may be added (max_workers)
    handmade: bool = False  # v2: no node has a node type name: `ray start` by hand, nothing to add
    configured_gpus: float | None = None  # per node, when the autoscaler published its node types


@dataclass
class Answer:
    verdict: str
    why: str
    facts: dict = field(default_factory=dict)  # what the probe found on a GPU node, when it ran


def judge(history: list[Look], gpus: float, updates: int = UPDATES_TO_WAIT) -> str:
    """The verdict from the looks taken since the probe was submitted (oldest first)."""
    last = history[-1]
    if last.gpus_alive >= gpus:
        return ALIVE
    if last.configured_gpus is not None:
        return CONFIGURED if last.configured_gpus >= gpus else NONE
    if last.kind == "readonly":
        return NONE
    if last.infeasible:
        return NONE if last.handmade else INFEASIBLE
    if last.launching_gpus:
        return LAUNCHING
    seen = next((i for i, look in enumerate(history) if look.demand_seen), None)
    if seen is None:
        return WAIT
    if last.kind == "v2" and last.launching_any:
        return LAUNCHING
    reports = len({look.version for look in history[seen:]}) - 1  # updates since the demand appeared
    return STUCK if reports >= updates else WAIT


# ---------------------------------------------------------------------------------------------
# Reading Ray's state (private parts guarded: a Ray that moved them reads as "not reported")
# ---------------------------------------------------------------------------------------------
def _fits(bundle: dict, gpus: float) -> bool:
    """A demand shape the probe's {GPU: gpus} could be (the probe asks for nothing else)."""
    return float(bundle.get("GPU", 0)) >= gpus and all(k in ("GPU", "CPU") or k.startswith("node:") for k in bundle)


def _alive_gpus() -> float:
    import ray

    return max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def _configured_gpus() -> float | None:
    """Most GPUs one node type has, from the cluster config an autoscaler published in the GCS."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is None or not config.node_group_configs:
            return None
        return max((float(g.resources.get("GPU", 0)) for g in config.node_group_configs if g.max_count != 0),
                   default=0.0)
    except Exception:  # noqa: BLE001 - private API; absent or moved reads as "not published"
        return None


def _v1_status() -> dict | None:
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001
        return None


def _v2_state():
    try:
        import ray
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=5))
        return reply if reply.autoscaling_state.autoscaler_state_version > 0 else None
    except Exception:  # noqa: BLE001
        return None


def look(gpus: float) -> Look:
    alive, configured = _alive_gpus(), _configured_gpus()
    if (v1 := _v1_status()) is not None:
        report = v1.get("autoscaler_report") or {}
        types = set((report.get("active_nodes") or {})) | set((report.get("node_type_mapping") or {}).values())
        readonly = bool(types) and all(_READONLY_TYPE.fullmatch(t) for t in types)
        demand = (v1.get("load_metrics_report") or {}).get("resource_demand") or []
        return Look(alive, "readonly" if readonly else "v1", float(v1.get("time", 0)),
                    demand_seen=any(_fits(shape, gpus) for shape, _ in demand),
                    launching_gpus=float((report.get("pending_resources") or {}).get("GPU", 0)) > 0,
                    configured_gpus=configured)
    if (v2 := _v2_state()) is not None:
        state, resources = v2.autoscaling_state, v2.cluster_resource_state
        return Look(alive, "v2", float(state.autoscaler_state_version),
                    demand_seen=any(_fits(dict(r.request.resources_bundle), gpus)
                                    for r in resources.pending_resource_requests),
                    launching_any=bool(len(state.pending_instance_requests) or len(state.pending_instances)),
                    infeasible=any(_fits(dict(r.resources_bundle), gpus) for r in state.infeasible_resource_requests),
                    handmade=not any(n.ray_node_type_name for n in resources.node_states),
                    configured_gpus=configured)
    return Look(alive, "none", configured_gpus=configured)


def _probe_task(gpus: float):
    import ray

    from .nodes import gpu_node_facts

    # No CPU: it must fit any GPU node type, and it only reads facts there.
    return ray.remote(gpu_node_facts).options(num_gpus=gpus, num_cpus=0, max_retries=0, name="diffmix-gpu-probe")


def _why(verdict: str, last: Look, waited: float) -> str:
    if verdict == ALIVE:
        return f"GPU nodes are up now ({last.gpus_alive:g} GPUs on one node)"
    if verdict == CONFIGURED:
        return f"its autoscaler's node types hold up to {last.configured_gpus:g} GPUs per node"
    if verdict == LAUNCHING:
        return f"its autoscaler ({last.kind}) is adding a GPU node; {waited:.0f} s to decide"
    if verdict == INFEASIBLE:
        return (f"its autoscaler ({last.kind}) calls the GPU request infeasible: no node type holds it, or "
                "max_workers allows no more nodes")
    if verdict == NONE:
        if last.configured_gpus is not None:
            return "its autoscaler's node types have no GPUs"
        return ("its nodes were started by hand: its autoscaler (v2) adds none" if last.handmade
                else "it has no autoscaler that can add nodes")
    if verdict == STUCK:
        return (f"its autoscaler ({last.kind}) saw the GPU request for {UPDATES_TO_WAIT} updates ({waited:.0f} s) "
                "and started no GPU node: it has no GPU node type, or it is at max_workers")
    return f"its autoscaler did not answer within {waited:.0f} s"


def _facts_from_an_alive_gpu(gpus: float, clock, sleep) -> dict:
    """What a probe finds on a GPU node that is up now; {} when no GPU frees up within CHECK_S (the
    GPUs are busy: the stage's work will wait for them anyway)."""
    import ray

    probe = _probe_task(gpus).remote()
    deadline = clock() + CHECK_S
    while clock() < deadline:
        ready, _ = ray.wait([probe], timeout=0)
        if ready:
            return ray.get(probe)
        sleep(0.2)
    ray.cancel(probe, force=True)
    return {}


def gpu_answer(gpus: float, private: bool, check_cuda: bool = False, sleep=time.sleep,
               clock=time.monotonic) -> Answer:
    """Can `gpus` GPUs on one node be had? `private`: a Ray this process started (no autoscaler can
    add to it: answered from its nodes alone, at once). Otherwise a probe task asks the autoscaler;
    it is cancelled once the verdict is in (a launch, once begun, goes on: the stage's own demand
    keeps the node). `check_cuda`: when GPU nodes are up, a probe also looks at CUDA on one of them
    (Ray Train's workers would otherwise fail inside its NCCL set-up, before any of this project's
    code runs, on a node whose GPU has no CUDA)."""
    import ray

    first = look(gpus) if not private else Look(_alive_gpus(), "readonly")
    if private or judge([first], gpus) in (ALIVE, CONFIGURED, NONE):
        verdict = judge([first], gpus)
        facts = _facts_from_an_alive_gpu(gpus, clock, sleep) if check_cuda and verdict == ALIVE else {}
        return Answer(verdict, _why(verdict, first, 0), facts)
    started = clock()
    probe = _probe_task(gpus).remote()
    history, facts = [first], {}
    try:
        while True:
            ready, _ = ray.wait([probe], timeout=0)
            if ready:
                facts = ray.get(probe)
            history.append(look(gpus))
            verdict = ALIVE if ready else judge(history, gpus)
            waited = clock() - started
            if verdict == WAIT and history[-1].kind == "none" and waited < FIRST_REPORT_S:
                sleep(0.5)
                continue
            if verdict == WAIT and history[-1].kind == "none":
                verdict = NONE  # no autoscaler reported at all: a cluster that adds no nodes
            if verdict != WAIT or waited >= DECIDE_S:
                return Answer(STUCK if verdict == WAIT else verdict, _why(verdict, history[-1], waited), facts)
            sleep(0.5)
    finally:
        if not facts:
            ray.cancel(probe, force=True)
