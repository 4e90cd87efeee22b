"""Stage an s3:// model folder onto every node of a running cluster, once per node.

One Ray task per alive node, pinned there (NodeAffinitySchedulingStrategy, hard), each calling
models.loader.stage_model: the node's file lock and cache make a repeat a no-op. Nodes that join
later (autoscaling from zero) stage on their first load through the same function, so this is a
warm-up that takes the download off the critical path, not a requirement."""

from __future__ import annotations

import os

from ..errors import DiffmixError

# Staging waits on S3, not the CPU; claiming no CPU lets it run on a node whose cores are all
# held by translation actors or training workers, instead of queueing behind them.
_STAGE_CPUS = 0


def _stage_here(uri: str) -> dict:
    import socket

    import ray

    from ..models.loader import stage_model

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "path": stage_model(uri)}


def _worker_nodes(nodes: list[dict]) -> tuple[list[dict], list[dict]]:
    """(nodes that run work, nodes that cannot): a head started with no CPUs and no GPUs (as in
    cluster/*.yaml) never loads a model, so staging there would only fill its disk."""
    alive = [n for n in nodes if n.get("Alive")]
    runs = [n for n in alive if n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0]
    return runs, [n for n in alive if n not in runs]


def stage_on_all_nodes(uri: str, timeout_s: float = 3600) -> list[dict]:
    """Stage `uri` on every alive node with CPUs or GPUs; returns [{node_id, host, path}], one per
    node. Joins the cluster RAY_ADDRESS names (or the one `ray start` left on this machine)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .. import storage

    if not storage.is_s3(uri):
        raise DiffmixError(f"--all-nodes stages an s3:// model folder; {uri!r} is local. Copy it to every node "
                           "yourself, or upload it (`aws s3 sync DIR s3://bucket/models/NAME`) and stage that")
    address = os.environ.get("RAY_ADDRESS", "")
    if not ray.is_initialized() and address.startswith(("http://", "https://")):
        raise DiffmixError(f"--all-nodes runs a Ray task on every node, so it runs inside the cluster; RAY_ADDRESS "
                           f"is the dashboard URL {address}. Submit it as a job: `ray job submit -- diffmix-ray "
                           f"model stage {uri} --all-nodes` (or run it on the head with RAY_ADDRESS unset)")
    if not ray.is_initialized():
        try:
            ray.init(address="auto", log_to_driver=False)
        except ConnectionError as e:
            raise DiffmixError(f"--all-nodes needs a running Ray cluster ({e}); run it on the head node, as a Ray "
                               "job, or with RAY_ADDRESS=HEAD:6379") from None
    nodes, skipped = _worker_nodes(ray.nodes())
    if not nodes:
        raise DiffmixError("the cluster has no alive node with CPUs or GPUs yet (workers scale from zero); stage "
                           "again once workers are up, or let each node stage on its first load")
    task = ray.remote(_stage_here)
    refs = [task.options(num_cpus=_STAGE_CPUS, max_retries=2, name=f"stage-model-{n['NodeID'][:8]}",
                         scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(uri)
            for n in nodes]
    try:
        results = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise DiffmixError(f"staging {uri} took longer than {timeout_s:.0f} s on some node; rerun (finished nodes "
                           "are not copied again)") from None
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), DiffmixError) else e
        raise DiffmixError(f"staging {uri} failed on a node: {cause}") from None
    for n in skipped:
        results.append({"node_id": n["NodeID"], "host": n.get("NodeManagerHostname", ""), "path": None,
                        "skipped": "no CPUs or GPUs: runs no work"})
    return results
