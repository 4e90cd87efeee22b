"""One writer per output: a lease object in the output (`_lease.json`), on local disk or S3.

The lease records who writes (a per-process owner token, host, pid, what) and a heartbeat that a
background thread renews. It is taken atomically: locally by linking a complete temp file to the
lease name (link fails when the name exists), on S3 by a conditional PUT (`If-None-Match: *`).
A second run finds the lease and is refused with who holds it. A lease is stale when its writer is
gone: its pid is no longer running on this host, or its heartbeat is older than EXPIRES_S (another
host, or a pid reused). A stale lease is taken over with a warning, again atomically: locally by
renaming it aside (one renamer wins), on S3 by a PUT conditional on the stale object's ETag.

Leases are re-entrant within a process (a resume in the same process, a recipe's stages) and
released when the scope that took them ends (`scoped`), or at exit."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid

from . import storage
from .console import logger
from .contracts import LEASE_JSON
from .errors import DiffmixError

HEARTBEAT_S = 30.0  # how often a held lease is renewed
EXPIRES_S = 180.0  # a lease not renewed for this long belongs to a writer that is gone

_owner = uuid.uuid4().hex
_held: dict[str, dict] = {}  # lease URI -> the record written there
_taken_in: dict[str, int] = {}  # lease URI -> the thread that took it (what `scoped` releases)
_lost: set[str] = set()  # leases another run took over while this one held them
_lock = threading.RLock()
_wake = threading.Event()
_thread: threading.Thread | None = None


def _new_owner() -> None:  # a forked child is another writer
    global _owner, _thread
    _owner, _thread = uuid.uuid4().hex, None
    _held.clear()
    _taken_in.clear()
    _lost.clear()


os.register_at_fork(after_in_child=_new_owner)


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8")


def _s3_key(uri: str) -> tuple:
    fs, path = storage.filesystem(uri)
    bucket, _, key = path.partition("/")
    return fs, bucket, key


def create_exclusive(uri: str, record: dict) -> bool:
    """Write `record` at `uri` only if nothing is there; True when this call created it."""
    data = _encode(record)
    with storage.explained(uri):
        if storage.is_s3(uri):
            fs, bucket, key = _s3_key(uri)
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            fs.invalidate_cache(f"{bucket}/{key}")
            return True
        path = storage.normalize(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists: readers never see a partial lease
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)


def _read(uri: str) -> tuple[dict | None, str | None]:
    """(record or None when absent, S3 ETag read before the content). An unreadable record is {}."""
    etag = None
    with storage.explained(uri):
        try:
            if storage.is_s3(uri):
                fs, bucket, key = _s3_key(uri)
                etag = fs.info(f"{bucket}/{key}", refresh=True)["ETag"]
                data = fs.cat_file(f"{bucket}/{key}")
            else:
                with open(storage.normalize(uri), "rb") as f:
                    data = f.read()
        except FileNotFoundError:
            return None, None
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, etag
    return (record if isinstance(record, dict) else {}), etag


def _out_of(uri: str) -> str:
    return uri[:-len(LEASE_JSON) - 1]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (dead, not yet reaped) holds its pid but runs nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _gone(have: dict) -> str | None:
    """Why the writer of `have` is gone, or None while it may still be writing."""
    if not have:
        return "left an unreadable lease"
    if have.get("host") == socket.gethostname() and isinstance(have.get("pid"), int) \
            and not _pid_running(have["pid"]):
        return "is no longer running"
    age = time.time() - float(have.get("heartbeat_at") or 0)
    if age > EXPIRES_S:
        return f"sent no heartbeat for {age:.0f} s (a lease expires after {EXPIRES_S:.0f} s)"
    return None


def _describe(have: dict) -> str:
    age = time.time() - float(have.get("heartbeat_at") or 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(have.get("started_at") or 0)))
    return (f"pid {have.get('pid')} on {have.get('host')}, `{have.get('what')}` since {started}, "
            f"last heartbeat {age:.0f} s ago")


def _take_over(uri: str, have: dict, etag: str | None, record: dict) -> bool:
    """Replace the stale lease `have` by `record`, unless someone changed it meanwhile."""
    if storage.is_s3(uri):
        fs, bucket, key = _s3_key(uri)
        try:  # the ETag was read before the content: any change since makes the PUT fail
            with storage.explained(uri):
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_encode(record), IfMatch=etag)
        except (DiffmixError, OSError):
            return False
        fs.invalidate_cache(f"{bucket}/{key}")
        return True
    path = storage.normalize(uri)
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)  # one of several takers wins; the others find nothing to rename
    except FileNotFoundError:
        return False
    with open(aside, "rb") as f:
        moved = f.read()
    try:
        same = json.loads(moved) == have if have else True
    except json.JSONDecodeError:
        same = not have
    if not same:  # renewed or taken by someone else after we read it: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)
        return False
    os.remove(aside)
    return create_exclusive(uri, record)


def acquire(out: str, what: str) -> None:
    """Make this process the one writer of `out`, or raise DiffmixError naming the writer."""
    uri = storage.join(out, LEASE_JSON)
    with _lock:
        if uri in _held:
            return
    now = time.time()
    record = {"owner": _owner, "host": socket.gethostname(), "pid": os.getpid(), "started_at": now,
              "heartbeat_at": now, "what": what}
    for _ in range(5):
        if create_exclusive(uri, record):
            break
        have, etag = _read(uri)
        if have is None:
            continue  # released between our attempts
        if have.get("owner") == _owner:
            record = have
            break
        why = _gone(have)
        if why is None:
            raise DiffmixError(f"{out} is being written by another run ({_describe(have)}); wait for it to "
                               f"finish or choose another --out (a lease whose writer died is taken over once its "
                               f"heartbeat is {EXPIRES_S:.0f} s old, or at once on the same host)")
        if _take_over(uri, have, etag, record):
            logger.warning("taking over %s: its writer (pid %s on %s) %s", out, have.get("pid"), have.get("host"), why)
            break
    else:
        raise DiffmixError(f"could not take the lease of {out}: other runs keep taking it; wait and rerun")
    with _lock:
        _held[uri] = record
        _taken_in[uri] = threading.get_ident()
        _lost.discard(uri)
        _start_heartbeat()


def _start_heartbeat() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_beat, name="diffmix-lease-heartbeat", daemon=True)
        _thread.start()


def _beat() -> None:
    while True:
        _wake.wait(HEARTBEAT_S)
        _wake.clear()
        with _lock:
            held = list(_held.items())
        for uri, record in held:
            try:
                renew(uri, record)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the run goes on
                logger.warning("could not renew the lease %s (%s); retrying in %.0f s", uri, e, HEARTBEAT_S)


def renew(uri: str, record: dict) -> None:
    have, _ = _read(uri)
    with _lock:
        if uri not in _held:
            return
        if have is None or have.get("owner") != record["owner"]:
            _lost.add(uri)
            del _held[uri]
            _taken_in.pop(uri, None)
            logger.error("the lease %s was taken by another run (%s): this run no longer owns its output",
                         uri, _describe(have) if have else "deleted")
            return
        record["heartbeat_at"] = time.time()
    storage.write_bytes_atomic(uri, _encode(record))


def check_held(out: str) -> None:
    """Before a run marks `out` complete: refuse when another run took the lease meanwhile."""
    uri = storage.join(out, LEASE_JSON)
    if uri in _lost:
        raise DiffmixError(f"another run took over {out} while this one was writing it: its result is not "
                           "marked complete; check which run should own it and rerun that one")


def release(out: str) -> None:
    uri = storage.join(out, LEASE_JSON)
    with _lock:
        record = _held.pop(uri, None)
        _taken_in.pop(uri, None)
    if record is None:
        return
    with contextlib.suppress(Exception):  # best effort: an unreleased lease goes stale, then is taken over
        have, _ = _read(uri)
        if have and have.get("owner") == record["owner"]:
            storage.remove_tree(uri)


def release_all() -> None:
    with _lock:
        held = list(_held)
    for uri in held:
        release(_out_of(uri))


def held() -> list[str]:
    with _lock:
        return sorted(_out_of(u) for u in _held)


def scoped(fn):
    """Release the leases `fn` took when it returns or raises: not those held before it ran, nor those
    another thread took meanwhile (a stage run beside it in the same process keeps its output's)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        me = threading.get_ident()
        with _lock:
            before = set(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                taken = {uri for uri in set(_held) - before if _taken_in.get(uri) == me}
            for uri in taken:
                release(_out_of(uri))

    return wrapper


atexit.register(release_all)
