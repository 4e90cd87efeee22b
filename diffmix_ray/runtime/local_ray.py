"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import math
import os


# Ray's switch for clusters on macOS and Windows. Off, Ray keeps a node asked for 127.0.0.1 on it: on
# Linux it otherwise swaps in the machine's LAN address (services.resolve_ip_for_localhost), and its
# GCS, raylet and agents then listen on every interface, open to the network without auth.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_on_loopback() -> None:
    """Make the Ray this process starts serve on 127.0.0.1 only: the environment variable for the
    processes it starts (and a fresh `import ray`), and the constant Ray already read at import."""
    os.environ[LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # private; if it moved, a fresh import reads the variable
        pass


def start_private_ray(**init_kwargs) -> None:
    """`ray.init` of a new Ray on this machine that listens on 127.0.0.1 only (the two halves go
    together: Ray resolves the address it is given, and keep_on_loopback stops it there)."""
    import ray

    keep_on_loopback()
    ray.init(_node_ip_address="127.0.0.1", **init_kwargs)


def init_ray(min_cpus: float = 1.0) -> None:
    """Join the Ray the environment names (RAY_ADDRESS, e.g. under `ray job submit`, or a
    `ray start` on this node). Otherwise start a private one for this run:
      * bound to loopback (start_private_ray): nothing outside this machine needs to reach it;
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
    start_private_ray(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)


def started_here() -> bool:
    """True when this process started the Ray it is connected to (a private `ray.init`): no
    autoscaler can add nodes to it."""
    try:
        import ray

        node = ray._private.worker._global_node  # private; guarded: if it moved, ask the cluster instead
        return node is not None and bool(node.head)
    except Exception:  # noqa: BLE001
        return False


def resolve_gpus(requested: float | None, stage: str, unit: str) -> float:
    """GPUs per actor/worker. The user's number when given, after checking that the cluster can
    ever run it (an unsatisfiable request is an error in bounded time, not Ray's endless
    "infeasible" warning). Otherwise 1 when the cluster has GPUs or its autoscaler adds a GPU node
    for a GPU request (autoscaling pools start at zero nodes: runtime/autoscaler.py asks), else 0.
    Says which in one line, so nobody burns hours in fp32 on CPU beside idle GPU nodes without
    having asked for it."""
    from ..console import console
    from ..errors import DiffmixError
    from .autoscaler import CAN, gpu_answer
    from .nodes import cpu_fallback_warning, cpu_instead_of_missing_cuda

    flag = f"--gpus-per-{unit}"
    if requested is not None and float(requested) <= 0:
        return 0.0
    gpus = float(requested) if requested is not None else 1.0
    answer = gpu_answer(gpus, private=started_here(), check_cuda=unit == "worker")  # workers: Ray Train
    if answer.facts and not answer.facts.get("cuda"):  # the probe ran on a GPU node that cannot run CUDA
        if not cpu_instead_of_missing_cuda():
            raise DiffmixError(f"{stage}: {answer.facts['message']}")
        cpu_fallback_warning(answer.facts["node"])
    if answer.verdict in CAN:
        if requested is None:
            console.print(f"{stage}: 1 GPU per {unit} (the Ray cluster: {answer.why}); pass {flag} 0 to run on CPU",
                          highlight=False)
        return gpus
    if requested is None and answer.verdict == "none":
        console.print(f"{stage}: no GPUs in this Ray cluster ({answer.why}): running on CPU in fp32", highlight=False)
        return 0.0
    if requested is None:
        raise DiffmixError(f"{stage}: no GPU for the default of 1 GPU per {unit}: {answer.why}. Pass {flag} 0 to run "
                           "on CPU, or give the cluster a GPU node type (or room under max_workers)")
    raise DiffmixError(f"{flag} {gpus:g}: this cluster has no node type with {gpus:g} GPU(s) it can start "
                       f"({answer.why}): pass {flag} 0 to run on CPU, or add such a node type")
