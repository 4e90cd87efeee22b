"""Which Ray node this process runs on, and what a node whose GPU has no CUDA gets told.

Ray hands out "GPU" as a number its node was started with: a node image without the NVIDIA driver,
a CPU build of torch, or Ray's fake multi-node provider (whose "GPU" nodes are processes on one
machine) all advertise GPUs that torch cannot use. Work sent there fails with one line that names
the node and the fix, not a CUDA traceback from deep inside a model.

DIFFMIX_GPU_WITHOUT_CUDA=cpu is for tests and for trying the fake provider: such a node runs the
work on its CPU in float32 instead (said in one warning line). Never set it on a real cluster: it
would hide a broken GPU node behind a slow run."""

from __future__ import annotations

import contextlib
import logging
import os
import re

GPU_WITHOUT_CUDA_ENV = "DIFFMIX_GPU_WITHOUT_CUDA"

logger = logging.getLogger("diffmix_ray.runtime")


def describe_node() -> str:
    """'node 10.0.0.7 (id 3f2a91c0...)' inside a Ray task or actor, else 'this machine'."""
    try:
        import ray
        from ray._private import worker  # private: which kind of process this is; guarded

        if ray.is_initialized() and worker.global_worker.mode == worker.WORKER_MODE:
            node_id = ray.get_runtime_context().get_node_id()
            return f"node {ray.util.get_node_ip_address()} (id {node_id})"
    except Exception:  # noqa: BLE001 - describing the node must never be what fails
        pass
    return "this machine"


def cpu_instead_of_missing_cuda() -> bool:
    return os.environ.get(GPU_WITHOUT_CUDA_ENV, "").strip().lower() == "cpu"


def assigned_gpus() -> str:
    """The GPU ids Ray assigned to this worker, or CUDA_VISIBLE_DEVICES outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            ids = ray.get_gpu_ids()
            if ids:
                return f"Ray assigned GPU {','.join(str(i) for i in ids)}"
    except Exception:  # noqa: BLE001
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "a GPU was requested"


def no_cuda_message(where: str | None = None) -> str:
    """One line: which node, what it claims, what torch sees, what to do."""
    import torch

    build = f"torch {torch.__version__}" + (f" (a CUDA {torch.version.cuda} build)" if torch.version.cuda
                                             else " (a CPU-only build)")
    where = where or describe_node()
    if where == "this machine":
        return (f"a CUDA device was requested but {build} sees none on this machine: install the NVIDIA driver and a "
                "CUDA build of torch, or run on CPU (device 'cpu'; --gpus-per-actor 0 / --gpus-per-worker 0)")
    return (f"{where} advertises GPUs to Ray ({assigned_gpus()}) but {build} sees no CUDA device there: fix that "
            "node's image (NVIDIA driver, CUDA build of torch) or its node type's GPU count, or run on CPU with "
            "--gpus-per-actor 0 / --gpus-per-worker 0")


_warned: set[str] = set()


def cpu_fallback_warning(where: str | None = None) -> None:
    where = where or describe_node()
    if where in _warned:  # once per process and node: an actor loads several models
        return
    _warned.add(where)
    logger.warning("%s advertises GPUs but has no CUDA; %s=cpu: running on its CPU in float32 (tests and Ray's "
                   "fake multi-node provider only)", where, GPU_WITHOUT_CUDA_ENV)


def gpu_node_facts() -> dict:
    """What a task that Ray placed with a GPU finds on its node (runs inside that task)."""
    import socket

    facts = {"node": describe_node(), "host": socket.gethostname(), "gpus": assigned_gpus()}
    try:
        import torch

        facts["cuda"] = bool(torch.cuda.is_available())
        if not facts["cuda"]:
            facts["message"] = no_cuda_message(facts["node"])
    except ImportError:
        facts.update(cuda=False, message=f"{facts['node']} has no torch installed: the node's image is not "
                                         "diffmix-ray's (cluster/docker/Dockerfile)")
    return facts


_REMOTE_DIFFMIX = re.compile(r"^\S*DiffmixError\S*: (.+)$", re.MULTILINE)


def remote_error(exc: BaseException):
    """The DiffmixError a Ray task, actor or training worker raised, from what reaches the driver:
    Ray Data and Ray Train hand back actor deaths and wrappers whose text holds the remote
    traceback (the exception object itself is gone); its last line is the message. None when the
    failure was not a DiffmixError."""
    from ..errors import DiffmixError

    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(getattr(e, "cause", None), DiffmixError):
            return DiffmixError(str(e.cause))
        if isinstance(e, DiffmixError) and type(e).__module__.startswith("diffmix_ray"):
            return e  # raised here, not a Ray wrapper of a remote one
        found = _REMOTE_DIFFMIX.findall(str(e))
        if found:
            return DiffmixError(found[-1].strip())
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None) if isinstance(getattr(e, "cause", None),
                                                                                         BaseException) else None]
    return None


@contextlib.contextmanager
def remote_errors_as_one_line(out: str | None = None):
    """A DiffmixError raised on some node (say, in an actor's __init__) reaches the user as its own
    one-line message, not as the actor death or Ray Data wrapper that carried it back; so does a
    full disk, a quota or a read-only file system met while writing `out`."""
    from .. import storage

    try:
        yield
    except Exception as e:
        if out is not None and (said := storage.explain_task_error(e, out)) is not None:
            raise said from None
        found = remote_error(e)
        if found is None or found is e:
            raise
        raise found from None
