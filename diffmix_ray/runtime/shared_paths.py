"""On a multi-node Ray cluster, every local path of a run must be the same folder on every node.

A local --out, --dataset or --model that is only a folder on the driver's machine scatters shards
across node disks (and loses them with the node), or leaves workers without their inputs. Before a
stage starts work, one task per alive node that runs work, pinned there, looks at each local path:
an input must list the same entries (names, sizes) as on the driver; --out must hold the marker file
the driver has just written into it (so it is the same folder, not a look-alike). Any difference
refuses the run with the fix: s3:// paths, or a shared mount at the same path on every node.
Nodes that join later (autoscaling) are not there to be asked: docs/operations.md says so.

DIFFMIX_TEST_NODE_ROOT (tests only) makes a node look at ROOT/<path> instead of <path>, as a node
with a disk of its own would: on one machine every node otherwise shares one filesystem."""

from __future__ import annotations

import hashlib
import os
import uuid

TEST_ROOT_ENV = "DIFFMIX_TEST_NODE_ROOT"
PROBE_TIMEOUT_S = 120.0


def _on_this_node(path: str) -> str:
    root = os.environ.get(TEST_ROOT_ENV, "")
    return os.path.join(root, path.lstrip(os.sep)) if root else path


def listing_digest(path: str) -> str | None:
    """What a folder (or file) holds, as far as telling two copies apart goes: entry names, kinds and
    file sizes of its top level. None when nothing is there."""
    if os.path.isfile(path):
        return f"file:{os.path.getsize(path)}"
    if not os.path.isdir(path):
        return None
    entries = []
    with os.scandir(path) as found:
        for e in found:
            if e.name.startswith(".diffmix-visible-"):
                continue  # other runs' markers come and go
            entries.append(f"{e.name}/" if e.is_dir() else f"{e.name}:{e.stat().st_size}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def look_here(paths: list[str], marker: str | None, token: str | None) -> dict:
    """Runs on each node: the digest of each input path, and whether the driver's marker is there."""
    from .nodes import describe_node

    seen = [listing_digest(_on_this_node(path)) for path in paths]
    marker_ok = None
    if marker:
        try:
            with open(_on_this_node(marker), encoding="utf-8") as f:
                marker_ok = f.read() == token
        except OSError:
            marker_ok = False
    return {"node": describe_node(), "seen": seen, "marker": marker_ok}


def _local(value: str | None) -> str | None:
    """The absolute path of a local input, None for s3:// URIs and names that are not paths (model
    presets such as `tiny`, hub ids)."""
    if not value or "://" in value:
        return None
    path = os.path.abspath(os.path.expanduser(value))
    return path if os.path.exists(path) else None


def _work_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0
                                                          or n.get("Resources", {}).get("GPU", 0) > 0)]


def _warn_if_nodes_may_join(stage: str) -> None:
    """Workers that an autoscaler adds later cannot be asked now: say so once."""
    from .autoscaler import look
    from .local_ray import started_here
    from .nodes import logger

    if not started_here() and look(1.0).kind in ("v1", "v2"):
        logger.warning("%s: local paths on an autoscaling Ray cluster whose worker nodes are not up yet: each node "
                       "that joins must see them at the same path (a shared mount), or its output is lost; s3:// "
                       "paths are safe", stage)


def check_shared_paths(stage: str, inputs: list[tuple[str, str | None]], out: str | None) -> None:
    """Refuse the run when a local path of it is not the same folder on every alive node that runs
    work. `inputs`: (flag, value as given); `out`: the output folder."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..errors import DiffmixError

    local = [(flag, value, path) for flag, value in inputs if (path := _local(value))]
    out_local = out if out and "://" not in out else None
    nodes = _work_nodes()
    here = ray.get_runtime_context().get_node_id()
    if not (local or out_local):
        return
    if not nodes or [n["NodeID"] for n in nodes] == [here]:  # one node (the driver's): nothing can differ yet
        _warn_if_nodes_may_join(stage)
        return
    mine = [listing_digest(path) for _, _, path in local]
    token = uuid.uuid4().hex
    marker = os.path.join(out_local, f".diffmix-visible-{token}") if out_local else None
    if marker:
        os.makedirs(out_local, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as f:
            f.write(token)
    task = ray.remote(look_here)
    try:
        refs = [task.options(num_cpus=0, max_retries=1, name="diffmix-shared-paths",
                             scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                                 [path for _, _, path in local], marker, token) for n in nodes]
        try:
            seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise DiffmixError(f"{stage}: checking that the run's local paths are the same on all {len(nodes)} nodes "
                               f"took over {PROBE_TIMEOUT_S:.0f} s; use s3:// paths, or retry") from None
    finally:
        if marker and os.path.exists(marker):
            os.remove(marker)
    problems = []
    for node in seen:
        for (flag, value, _), digest, expected in zip(local, node["seen"], mine):
            if digest != expected:
                what = "nothing" if digest is None else "other contents"
                problems.append(f"{node['node']} sees {what} at {flag} {value}")
        if marker and not node["marker"]:
            problems.append(f"{node['node']} does not see what this driver writes into --out {out}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DiffmixError(f"{stage}: this Ray cluster has {len(nodes)} nodes and every local path of a run must be "
                           f"the same folder on each, but {problems[0]}{more}. Use s3:// paths, or a shared mount "
                           "(NFS, EFS, Filestore) at the same path on every node")
