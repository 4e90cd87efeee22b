"""URI -> filesystem, atomic small-file writes, and output-directory ownership.

Local paths and `s3://` URIs go through fsspec (s3fs for S3). Credentials and the endpoint come
from the standard AWS environment/config chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles,
AWS_ENDPOINT_URL[_S3]); nothing here logs or stores them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import posixpath
import shutil
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow.fs as pafs

from .contracts import LEASE_JSON, RUN_JSON
from .errors import DiffmixError

S3_SCHEMES = ("s3://", "s3a://")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


def _without_query(uri: str) -> str:
    """`uri` cut at its query or fragment: presigned URLs carry their signature there, never printed."""
    return uri.split("?", 1)[0].split("#", 1)[0]


def normalize(uri: str) -> str:
    """Canonical spelling of a URI: absolute local path, or s3://bucket/key without trailing '/',
    '.' or '..' segments."""
    if is_s3(uri):
        if "?" in uri or "#" in uri:
            raise DiffmixError(f"{_without_query(uri)}?... has a query string: presigned or query URLs are not "
                               "supported (the query would become part of the key). Pass s3://bucket/key and let "
                               "the AWS credential chain sign the requests")
        key = posixpath.normpath("/" + uri.split("://", 1)[1]).strip("/")
        return "s3://" + key
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise DiffmixError(f"unsupported URI scheme {scheme!r} in {_without_query(uri)!r}; use a local path or "
                           "s3://bucket/key")
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(normalize(uri), *parts)
    return os.path.join(normalize(uri), *parts)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    uri = normalize(uri)
    if is_s3(uri):
        return _s3_filesystem(), uri.split("://", 1)[1]
    return fsspec.filesystem("file"), uri


_S3_INSTANCES: dict[tuple, Any] = {}
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def _s3_filesystem():
    """One s3fs instance per (endpoint, credential source). s3fs's own instance cache ignores the
    environment, so a process whose AWS variables change would keep using stale credentials.

    No listings cache: other processes write the folders this one lists (Ray write tasks add
    shards while the driver waits; another driver, a lease holder), and s3fs would otherwise
    answer a second `ls` (and `exists` under a listed folder) from its first listing for the
    life of the process: a resumed run would settle on the files it found before writing."""
    import s3fs

    key = (s3_endpoint(),) + tuple(os.environ.get(v) for v in _CREDENTIAL_ENV)
    if key not in _S3_INSTANCES:
        kwargs: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if key[0]:
            kwargs["client_kwargs"] = {"endpoint_url": key[0]}
        _S3_INSTANCES[key] = s3fs.S3FileSystem(**kwargs)
    return _S3_INSTANCES[key]


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (for pyarrow.parquet and Ray Data) backed by the same fsspec one."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def _explain(uri: str, err: BaseException) -> DiffmixError:
    """Turn a storage exception into an error that names the input and the fix."""
    name = type(err).__name__
    text = str(err)
    if is_s3(uri):
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        if "NoCredentials" in name or "Unable to locate credentials" in text:
            return DiffmixError(
                f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE, or run on a node with an instance role / IRSA")
        if "NoSuchBucket" in text or "does not exist" in text or (
                isinstance(err, FileNotFoundError) and bucket in text and "/" not in text.split(bucket, 1)[1][:1]):
            return DiffmixError(f"S3 bucket {bucket!r} does not exist (for {uri}); create it or fix the URI")
        if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            return DiffmixError(f"access denied to {uri}: check the credentials' permissions on bucket {bucket!r}")
        if "EndpointConnectionError" in name or "Could not connect" in text:
            return DiffmixError(f"cannot reach the S3 endpoint for {uri} ({s3_endpoint() or 'AWS default'}); "
                                "check AWS_ENDPOINT_URL and the network")
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return DiffmixError(f"cannot write to {uri}: it is on a read-only file system; choose a writable --out")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiffmixError(f"no space left writing to {uri}: free some space (or raise the quota) and rerun the "
                            "same command, which resumes")
    if isinstance(err, FileNotFoundError):
        return DiffmixError(f"{uri} does not exist")
    if isinstance(err, PermissionError):
        return DiffmixError(f"permission denied on {uri}")
    return DiffmixError(f"storage error on {uri}: {name}: {text}")


def explain_task_error(err: BaseException, uri: str) -> DiffmixError | None:
    """A full disk, a quota or a read-only file system hit by a Ray task writing to `uri` reaches the
    driver wrapped (RayTaskError around the OSError, itself inside Ray Data's error): one line naming
    `uri` and the fix instead of Ray's traceback. None for any other error (a bug stays a traceback)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return _explain(uri, e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    text = str(err)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        if f"[Errno {code}]" in text:  # the cause could not travel back: its text did
            return _explain(uri, OSError(code, os.strerror(code)))
    return None


@contextlib.contextmanager
def explained(uri: str) -> Iterator[None]:
    """Re-raise storage errors raised inside the block as DiffmixError naming `uri`."""
    try:
        yield
    except DiffmixError:
        raise
    except Exception as err:  # noqa: BLE001 - every storage failure gets translated, then re-raised
        raise _explain(uri, err) from err


def check_bucket(uri: str) -> None:
    """Fail fast, before any work, when an s3:// URI's bucket or credentials are unusable."""
    if not is_s3(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    with explained(uri):
        try:
            fs.ls(bucket, refresh=True)  # raises on bad credentials, where exists() would say False
        except FileNotFoundError:
            raise DiffmixError(f"S3 bucket {bucket!r} does not exist (for {uri}); create it or fix the URI") from None


def read_parquet(uri: str, columns: list[str] | None = None):
    """One Parquet file as an Arrow table (only `columns`, when given)."""
    import pyarrow.parquet as pq

    fs, path = arrow_filesystem(uri)
    with explained(uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with explained(uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with explained(uri):
        return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DiffmixError(f"{uri} is not valid JSON ({e})") from e


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a prefix. S3 PUTs are already atomic;
    locally we write a sibling temp file and rename it over the target."""
    fs, path = filesystem(uri)
    with explained(uri):
        if is_s3(uri):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def write_json_atomic(uri: str, obj: Any) -> None:
    """Valid JSON only: NaN and infinity are refused (json.dumps would write the non-standard `NaN`,
    which strict readers reject and which would let a broken number pass as a result)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise DiffmixError(f"refusing to write {uri}: it would hold a non-finite number ({e}) at "
                           f"{_non_finite_path(obj) or '?'}") from None
    write_text_atomic(uri, text + "\n")


def _non_finite_path(obj: Any, where: str = "") -> str | None:
    """Where in `obj` the first NaN or infinity is, as a dotted path."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "."
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if found := _non_finite_path(v, f"{where}.{k}" if where else str(k)):
            return found
    return None


def list_dir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri`; [] when it does not exist."""
    fs, path = filesystem(uri)
    with explained(uri):
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def file_sizes(uri: str) -> dict[str, int]:
    """Base name -> size in bytes of the files directly under `uri` (one listing); {} when absent."""
    fs, path = filesystem(uri)
    with explained(uri):
        if not fs.exists(path):
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in fs.ls(path, detail=True)
                if e["type"] == "file"}


def read_tail(uri: str, size: int, n: int) -> bytes:
    """The last `n` bytes of the file `uri` of `size` bytes (one ranged read)."""
    fs, path = filesystem(uri)
    with explained(uri):
        return fs.cat_file(path, start=max(0, size - n), end=size)


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    with explained(uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def makedirs(uri: str) -> None:
    if not is_s3(uri):  # S3 has no directories
        with explained(uri):
            os.makedirs(normalize(uri), exist_ok=True)


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _holds_no_result(entries: list[str], have: dict[str, Any] | None, stage: str,
                     disposable: tuple[str, ...]) -> bool:
    """True when `out` holds only a claim: its _run.json (and a leftover temp file of it), plus, for
    a claim by this same stage, the entries that stage declares disposable (partial work it always
    redoes from scratch). Such an output is what a run that failed before writing a result leaves."""
    if have is None:
        return False
    extra = [e for e in entries if not e.startswith(RUN_JSON)]
    return all(e in disposable for e in extra) if have.get("stage") == stage else not extra


def _resolved(uri: str) -> str:
    """`uri` as the place it names: S3 normalised, local paths with every symlink resolved."""
    uri = normalize(uri)
    return uri if is_s3(uri) else os.path.realpath(uri)


def _within(inner: str, outer: str) -> bool:
    sep = "/" if is_s3(outer) else os.sep
    return inner.startswith(outer.rstrip(sep) + sep)


Inputs = dict[str, "str | list[str] | tuple[str, ...] | None"]


def path_like(spec: str | None) -> str | None:
    """`spec` when it names a place (an s3:// URI, a local path), None for a preset or hub name."""
    if spec and (is_s3(spec) or spec.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(spec)):
        return spec
    return None


def check_out_of_inputs(out: str, inputs: Inputs) -> None:
    """Refuse an output that is, contains or lies inside an input of the run (flag -> URI, or
    several, or None when not given): writing there, and above all --overwrite, would destroy the
    input. Compared as places: trailing slashes, '..', symlinks and s3a:// spellings resolved."""
    where = _resolved(out)
    for flag, given in inputs.items():
        for uri in ([given] if isinstance(given, str) else list(given or ())):
            place = _resolved(uri)
            if place == where:
                how = "is"
            elif _within(place, where):
                how = "contains"
            elif _within(where, place):
                how = "lies inside"
            else:
                continue
            raise DiffmixError(f"--out {out} {how} {flag} {uri}: a run never writes where it reads (--overwrite "
                               f"would delete its own input). Choose an --out outside every input")


def claim_output(out: str, stage: str, config: dict[str, Any], overwrite: bool = False,
                 disposable: tuple[str, ...] = (), *, inputs: Inputs) -> bool:
    """Make `out` belong to this (stage, config). Returns True when `out` already belonged to the
    same run (a resume); False when it was empty, held no result, or was wiped because of `overwrite`.

    Refuses a non-empty `out` that holds another stage's or another config's output, unless
    `overwrite`, in which case everything under `out` is deleted first. An output with no result in
    it is not owned: a run that failed before writing anything (bad input, say) leaves only its
    _run.json, and the corrected rerun must not need --overwrite. `disposable` names the entries
    this stage never resumes from (`prepare` rewrites images/ on every attempt), so a claim holding
    only those is free too.

    Before anything is read or deleted: `out` is checked against the run's `inputs` (it may never
    be, contain or lie inside one), and this process takes the output's lease (lease.py: one writer
    at a time), which --overwrite keeps."""
    from . import lease

    out = normalize(out)
    check_out_of_inputs(out, inputs)
    check_bucket(out)
    lease.acquire(out, stage)
    run_uri = join(out, RUN_JSON)
    want = {"stage": stage, "config_hash": config_hash(config), "config": config}
    entries = [e for e in list_dir(out) if e != LEASE_JSON]
    if entries:
        have = read_json(run_uri) if RUN_JSON in entries else None
        same = have is not None and have.get("stage") == stage and have.get("config_hash") == want["config_hash"]
        if same and not overwrite:
            return True
        if not overwrite and not _holds_no_result(entries, have, stage, disposable):
            if have is None:
                why = "it is not empty and was not written by diffmix-ray"
            elif have.get("stage") != stage:
                why = f"it holds the output of `{have.get('stage')}`"
            else:
                why = f"it holds a {stage} run with a different config (hash {have.get('config_hash')})"
            raise DiffmixError(f"refusing to write into {out}: {why}. "
                               "Choose another --out, or pass --overwrite to delete it and start again")
        if not is_s3(out) and os.path.isdir(out):
            for name in entries:  # keep the directory itself (it may be a mount point) and the lease
                p = os.path.join(out, name)
                with explained(p):
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        else:
            for name in entries:
                remove_tree(join(out, name))
    makedirs(out)
    write_json_atomic(run_uri, want)
    return False
