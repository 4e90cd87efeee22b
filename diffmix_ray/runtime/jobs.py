"""Ray job helpers: `diffmix-ray status / logs / stop` over the job-submission REST API, and the
line a stage prints when it starts inside a Ray job (where to watch it, which run it is).

Address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL (the
order `ray job` uses), else http://127.0.0.1:8265. Token auth: RAY_AUTH_TOKEN, when set, is sent as
a bearer token; it is never printed."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Optional

from ..console import console
from ..errors import DiffmixError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Set by Ray's job supervisor in every job driver's environment: {"runtime_env":..., "metadata":
# {"job_submission_id": ...}}. RAY_JOB_SUBMISSION_ID is honoured first for launchers that set it.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------
def resolve_address(address: Optional[str] = None) -> str:
    if address:
        if not address.startswith(("http://", "https://")):
            raise DiffmixError(f"--address {address!r} must be the dashboard's http(s) URL, e.g. {DEFAULT_ADDRESS} "
                               "(not the GCS address host:6379)")
        return address.rstrip("/")
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):  # inside a job RAY_ADDRESS is the GCS: skipped
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    return DEFAULT_ADDRESS


def connect(address: Optional[str] = None):
    """(JobSubmissionClient, its URL); errors name the address and what to check."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray's SDK lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given (inside a
    # job RAY_ADDRESS is the GCS, not the dashboard): pin the one resolved here while it is built.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        return JobSubmissionClient(url, headers=headers), url
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors all arrive as various types
        raise DiffmixError(_explain(url, e)) from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def _explain(url: str, err: BaseException) -> str:
    text = str(err)
    if "401" in text or "403" in text or "uthentication" in text:
        return (f"the Ray dashboard at {url} refused the request (token auth): export RAY_AUTH_TOKEN "
                "(`ray get-auth-token` on the head, or the KubeRay secret) and retry")
    return (f"cannot reach the Ray job API at {url} ({type(err).__name__}: {text.splitlines()[0] if text else ''}). "
            "Pass --address http://HEAD:8265 or export RAY_ADDRESS; for a remote cluster forward the port first "
            "(`ray dashboard cluster/aws.yaml` or `kubectl port-forward svc/diffmix-head-svc 8265`)")


def _call(url: str, fn, *args):
    """fn(*args) with the SDK's errors turned into messages that say what to do."""
    try:
        return fn(*args)
    except RuntimeError as e:  # the SDK raises RuntimeError("Request failed with status code 404: ...")
        if args and ("404" in str(e) or "does not exist" in str(e)):
            raise DiffmixError(f"no job with submission id {args[0]!r} at {url}; list recent jobs with "
                               "`diffmix-ray status`") from None
        raise DiffmixError(_explain(url, e)) from None
    except OSError as e:
        raise DiffmixError(_explain(url, e)) from None


# ---------------------------------------------------------------------------------------------
# Commands (logic; cli.py wires status/logs/stop to them)
# ---------------------------------------------------------------------------------------------
def _when(ms: Optional[int]) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(start: Optional[int], end: Optional[int]) -> str:
    if not start:
        return "-"
    seconds = ((end or time.time() * 1000) - start) / 1000
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def job_summary(info) -> dict:
    """The fields worth showing, JSON-able. Runtime env and metadata are shown as the cluster holds
    them: they never carry secrets because jobs/runtime_env.yaml holds none (tests check it)."""
    status = getattr(info.status, "value", str(info.status))
    return {"submission_id": info.submission_id, "job_id": info.job_id, "status": status,
            "entrypoint": info.entrypoint, "message": info.message, "start_time": _when(info.start_time),
            "end_time": _when(info.end_time), "duration": _duration(info.start_time, info.end_time),
            "metadata": info.metadata or {}, "runtime_env": info.runtime_env or {},
            "driver_node_id": getattr(info, "driver_node_id", None)}


def show_status(submission_id: Optional[str], address: Optional[str], as_json: bool, limit: int = 20) -> None:
    c, url = connect(address)
    if submission_id:
        summary = job_summary(_call(url, c.get_job_info, submission_id))
        if as_json:
            print(json.dumps(summary))
            return
        for key in ("submission_id", "status", "entrypoint", "start_time", "end_time", "duration", "message"):
            if summary[key]:
                console.print(f"{key:>14}  {summary[key]}")
        if summary["metadata"]:
            console.print(f"{'metadata':>14}  {json.dumps(summary['metadata'])}")
        console.print(f"{'dashboard':>14}  {url}/#/jobs/{submission_id}")
        return
    jobs = [j for j in _call(url, c.list_jobs) if j.submission_id]  # skip bare `python` drivers
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    rows = [job_summary(j) for j in jobs[:limit]]
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title=f"recent jobs at {url}")
    for col in ("submission id", "status", "started", "duration", "entrypoint"):
        table.add_column(col)
    for r in rows:
        entry = r["entrypoint"] if len(r["entrypoint"]) <= 60 else r["entrypoint"][:57] + "..."
        table.add_row(r["submission_id"], r["status"], r["start_time"], r["duration"], entry)
    console.print(table)


def wait_for(submission_id: str, address: Optional[str], poll_s: float = 2.0) -> str:
    """Block until the job is terminal; return its status."""
    c, url = connect(address)
    while True:
        status = _call(url, c.get_job_status, submission_id)
        status = getattr(status, "value", str(status))  # JobStatus is a str Enum
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def print_logs(submission_id: str, address: Optional[str], follow: bool) -> None:
    c, url = connect(address)
    if not follow:
        print(_call(url, c.get_job_logs, submission_id), end="", flush=True)
        return
    import asyncio

    _call(url, c.get_job_status, submission_id)  # a clear error for an unknown id before the websocket

    async def tail():
        async for chunk in c.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as e:
        raise DiffmixError(f"lost the log stream of {submission_id} at {url} ({e}); the job keeps running: "
                           f"`diffmix-ray logs {submission_id} --follow` reattaches") from None


def stop(submission_id: str, address: Optional[str]) -> bool:
    c, url = connect(address)
    return bool(_call(url, c.stop_job, submission_id))


# ---------------------------------------------------------------------------------------------
# Inside a job: where to watch it
# ---------------------------------------------------------------------------------------------
def current_submission_id() -> Optional[str]:
    """The submission id of the Ray job this process is the driver of, or None outside a job."""
    if sid := os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return sid
    try:
        return json.loads(os.environ.get(_JOB_CONFIG_ENV, "") or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def _dashboard_url() -> Optional[str]:
    """The cluster's dashboard URL as the head registered it in the GCS; None if unknown.
    Read without ray.init(): a stage calls this before it joins the cluster."""
    if url := os.environ.get("RAY_OVERRIDE_DASHBOARD_URL"):
        return url if "://" in url else f"http://{url}"
    gcs = os.environ.get("RAY_ADDRESS", "")
    if not gcs or "://" in gcs or gcs == "auto":
        return None
    try:
        from ray._raylet import GcsClient  # private but stable for years; failure only loses the URL

        raw = GcsClient(address=gcs).internal_kv_get(b"webui:url", namespace=b"dashboard", timeout=2)
    except Exception:  # noqa: BLE001
        return None
    if not raw:
        return None
    url = raw.decode()
    return url if "://" in url else f"http://{url}"


def announce(stage: str, run_id: str) -> None:
    """Inside a Ray job, print where to watch this stage and which run it is (nothing outside one)."""
    sid = current_submission_id()
    if not sid:
        return
    url = _dashboard_url()
    where = f"{url}/#/jobs/{sid}" if url else "the Ray dashboard's Jobs page"
    console.print(f"{stage} run {run_id} in Ray job {sid}: watch {where}; "
                  f"`diffmix-ray status {sid}`, `diffmix-ray logs {sid} --follow`")
