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
