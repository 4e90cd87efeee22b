"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import math
import os


def init_ray(min_cpus: float = 1.0) -> None:
    """Join the Ray the environment names (RAY_ADDRESS, e.g. under `ray job submit`, or a
    `ray start` on this node). Otherwise start a private one for this run:
      * bound to loopback: nothing outside this machine needs to reach it;
      * with at least the stage's CPUs (`min_cpus`: actors or training workers) plus one logical
        CPU for the light stages (reading, decoding, writing), so a stage may claim every core on a
        laptop without its data pipeline waiting forever for a CPU;
      * DIFFMIX_RAY_DASHBOARD=0 skips the dashboard (~10 processes; seconds of start-up on a
        small machine); RAY_TMPDIR relocates Ray's files, as everywhere in Ray."""
    import ray

    if ray.is_initialized():
        return
    try:
        from ray._private.utils import read_ray_address  # the address `ray start` leaves behind

        started_here = read_ray_address() is not None
    except Exception:  # noqa: BLE001 - private API; if it moved, fall back to Ray's own choice
        started_here = True
    if os.environ.get("RAY_ADDRESS") or started_here:
        ray.init(log_to_driver=True)
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus) + 1)
    dashboard = os.environ.get("DIFFMIX_RAY_DASHBOARD", "1").strip().lower() not in ("0", "false", "no", "off")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=dashboard,
             log_to_driver=True)


def cluster_gpus() -> tuple[float, float]:
    """(GPUs in the Ray cluster now, the most it can have: what its autoscaler's node types add up
    to, 0 when it has no autoscaler). Needs Ray initialised."""
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    try:  # what Ray Data itself reads to plan for autoscaling; private, so guarded
        from ray._private.state import state

        most = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0) or 0)
    except Exception:  # noqa: BLE001 - no autoscaler config (a local or fixed cluster), or the API moved
        most = 0.0
    return now, max(now, most)


def resolve_gpus(requested: float | None, stage: str, unit: str) -> float:
    """GPUs per actor/worker: `requested` when the user gave it, else 1 when the cluster has GPUs
    or can add them (an idle autoscaling GPU pool starts at 0 nodes), else 0. Says which in one
    line, so nobody burns hours in fp32 on CPU beside idle GPU nodes without having asked for it."""
    from ..console import console

    if requested is not None:
        return float(requested)
    now, most = cluster_gpus()
    if most > 0:
        console.print(f"{stage}: 1 GPU per {unit} (the Ray cluster has {now:g} GPUs now, up to {most:g} with "
                      f"autoscaling); pass --gpus-per-{unit} 0 to run on CPU")
        return 1.0
    console.print(f"{stage}: no GPUs in this Ray cluster (nor any its autoscaler can add): running on CPU in fp32")
    return 0.0
