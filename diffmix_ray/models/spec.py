"""One way to turn a model spec into a resolved folder, for every kind of model (the SD pipeline of
loader.py, the CLIP of clip.py): each kind declares itself once (a ModelKind: its presets, the files its
folder needs, its hub download and its error texts) and `resolve` does the rest the same way for all.

A spec is one of, tried in this order:
  * a preset built from config, optionally with a weight seed: `tiny`, `tiny:7` (no files);
  * a folder shipped in the package under a preset-like name (ModelKind.shipped);
  * `s3://bucket/prefix` holding a folder: staged once per node into a local cache (stage_folder);
  * a local folder (a path, or a name that exists; `./tiny` for a folder named like a preset);
  * a Hugging Face hub id, downloaded only because the user named it, refused under HF_HUB_OFFLINE=1.

Folders (local, staged or hub snapshots) are then checked by the kind's `validate` and fingerprinted by
their content, so the same weights give the same fingerprint wherever they came from."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .. import storage
from ..errors import DiffmixError
from . import sample as sample_models

CACHE_ENV = "DIFFMIX_MODEL_CACHE"
DEFAULT_CACHE = "~/.cache/diffmix-ray/models"
STAGED_MARKER = ".diffmix-staged.json"  # written last into a staged copy: its presence means complete
_EDGE_BYTES = 1 << 20  # weight files are fingerprinted by their first and last MiB
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelKind:
    """Everything that differs between kinds of model folder; `resolve` and `stage_folder` own the rest."""

    # the presets built from config: name -> preset; `fingerprint(name, seed)` identifies one's weights
    presets: Mapping[str, Any]
    preset_fingerprint: Callable[[str, int], str]
    spec_words: str  # how a bad seed names the spec: "model spec" -> "bad model spec 'tiny:x': ..."
    # the layout a folder needs: missing_parts(relative file names) -> what is missing (checked on a
    # bucket listing before any download, and on local folders); the refusal reads
    # "<where> is not a <folder_name>: missing <parts>. <layout_help>"
    missing_parts: Callable[[Iterable[str]], list[str]]
    folder_name: str
    layout_help: str
    validate: Callable[[str], None]  # the whole check of a local folder (layout and whatever else the kind needs)
    hub_id: re.Pattern  # the specs taken for hub ids; anything else that is not a path is refused
    hub_fetch: Callable[[str], str]  # repo id -> the snapshot folder (reached only online, on a named hub id)
    offline_error: Callable[[str], str]  # repo id -> the refusal under HF_HUB_OFFLINE=1
    hub_error: Callable[[str, Exception], str]  # (repo id, the hub's exception) -> the refusal
    unknown_error: Callable[[str], str]  # spec (redacted) -> the refusal of a spec that is nothing of the above
    # folders shipped in the package under a preset-like name: name -> the path, checked (the ref's kind
    # is the name); a shipped folder resolves like any other folder otherwise
    shipped: Mapping[str, Callable[[], str]] = field(default_factory=dict)

    def layout_error(self, where: str, missing: list[str]) -> DiffmixError:
        return DiffmixError(f"{where} is not a {self.folder_name}: missing {', '.join(missing)}. {self.layout_help}")


@dataclass(frozen=True)
class SpecRef:
    """What a model came from, for manifests and cache keys (the base of ModelRef and ClipRef). Holds no secrets."""

    spec: str  # as given, minus any credentials
    kind: str  # "preset" | "dir" | "s3" | "hub" | a shipped folder's name
    local_path: str | None  # the folder actually loaded; None for presets
    fingerprint: str  # same fingerprint <=> same weights and configs

    @property
    def location(self) -> str | None:
        """Where the weights are read from (an output must never be there); None for a preset."""
        return self.spec if self.kind == "s3" else self.local_path


@dataclass(frozen=True)
class Resolved(SpecRef):
    """A spec resolved to where its weights are, before anything is loaded."""

    preset: tuple[str, int] | None  # (name, seed) of a preset


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def redact(spec: str) -> str:
    """The spec without user:password@ or a query string (presigned URLs carry signatures there)."""
    if "://" not in spec:
        return spec
    parts = urllib.parse.urlsplit(spec)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_preset(kind: ModelKind, spec: str) -> tuple[str, int] | None:
    """('tiny', 7) for 'tiny:7', ('tiny', 0) for 'tiny'; None when `spec` names none of `kind`'s presets."""
    name, sep, seed = spec.partition(":")
    if name not in kind.presets or (sep and not seed):
        return None
    try:
        return name, int(seed) if sep else 0
    except ValueError:
        raise DiffmixError(f"bad {kind.spec_words} {spec!r}: the seed after ':' must be an integer, "
                           f"e.g. {name}:0") from None


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(spec)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_download(kind: ModelKind, repo_id: str) -> str:
    """The hub snapshot folder of `repo_id`: the hub is reached only here, and only because the user named it."""
    if hub_offline():
        raise DiffmixError(kind.offline_error(repo_id))
    try:
        return kind.hub_fetch(repo_id)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable message
        raise DiffmixError(kind.hub_error(repo_id, e)) from e


def resolve(kind: ModelKind, spec: str) -> Resolved:
    """Find (staging or downloading as needed) the model `spec` names, check its folder and fingerprint
    it, without loading weights."""
    clean = redact(spec)
    if preset := parse_preset(kind, spec):
        return Resolved(clean, "preset", None, kind.preset_fingerprint(*preset), preset)
    if spec in kind.shipped:
        ref_kind, path = spec, kind.shipped[spec]()
    elif storage.is_s3(spec):
        ref_kind, path = "s3", stage_folder(spec, kind)
    elif looks_like_path(spec):
        ref_kind, path = "dir", storage.normalize(spec)
    elif kind.hub_id.match(spec):
        ref_kind, path = "hub", hub_download(kind, spec)
    else:
        raise DiffmixError(kind.unknown_error(clean))
    kind.validate(path)
    if ref_kind not in kind.shipped:  # a folder `model train-sample` wrote: refused if a file changed since
        sample_models.verify(path)
    return Resolved(clean, ref_kind, path, dir_fingerprint(path), None)


def check_folder(kind: ModelKind, path: str, absent: str, a_file: str) -> list[str]:
    """The non-hidden files of the folder `path`, its layout checked by `kind`; `absent` and `a_file` are
    the refusals when `path` does not exist or is a file."""
    if not os.path.isdir(path):
        raise DiffmixError(absent if not os.path.exists(path) else a_file)
    files = list_files(path)
    if missing := kind.missing_parts(files):
        raise kind.layout_error(path, missing)
    return files


# ---------------------------------------------------------------------------------------------
# Folder contents and fingerprints
# ---------------------------------------------------------------------------------------------
def _is_hidden(rel: str) -> bool:
    # Hidden entries are tool bookkeeping (our staging marker, .cache/huggingface from
    # `huggingface-cli download --local-dir`, .gitattributes), not model content.
    return any(part.startswith(".") for part in rel.split("/"))


def list_files(folder: str) -> list[str]:
    """Relative POSIX paths of the non-hidden files under `folder`, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):  # hub snapshots are symlink farms
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not _is_hidden(rel):
                found.append(rel)
    return sorted(found)


def _file_digest(path: str, whole: bool) -> bytes:
    """sha256 of the whole file, or of its first and last MiB (enough to notice changed weights
    without reading 4 GB on every load)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if whole or size <= 2 * _EDGE_BYTES:
            for chunk in iter(lambda: f.read(_EDGE_BYTES), b""):
                h.update(chunk)
        else:
            h.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return h.digest()


def dir_fingerprint(path: str) -> str:
    """sha256 over sorted relative paths and sizes, whole configs (*.json, *.txt) and the edges of
    every other (weight) file. Hidden files are skipped, so a staged copy matches its source."""
    h = hashlib.sha256()
    for rel in list_files(path):
        full = os.path.join(path, rel)
        h.update(f"{rel}\0{os.path.getsize(full)}\0".encode("utf-8"))
        h.update(_file_digest(full, whole=rel.endswith((".json", ".txt"))))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# S3 staging
# ---------------------------------------------------------------------------------------------
def model_cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def _download_files(fs, remote: list[str], local: list[str]) -> None:
    """One batched, concurrent copy (fsspec's list form of `get`, which creates parent dirs)."""
    fs.get(remote, local)


def stage_folder(uri: str, kind: ModelKind) -> str:
    """Copy the model folder at `uri` (s3://) into the node-local model cache once, and return the
    local path. The listing is checked against `kind`'s layout before any download.

    The cache key covers the URI and the remote listing (names, sizes, ETags), so a changed model
    is staged afresh; a file lock makes concurrent processes on a node download once; the copy
    lands under a temp name and is renamed into place, marker file included."""
    uri = storage.normalize(uri)
    if not storage.is_s3(uri):
        raise DiffmixError(f"staging needs an s3:// URI, got {uri!r}; local folders need no staging")
    fs, root = storage.filesystem(uri)
    with storage.explained(uri):
        fs.invalidate_cache(root)  # fsspec instances are shared and cache listings
        listing = fs.find(root, detail=True)
    files: dict[str, dict] = {}
    for name, info in listing.items():
        if info.get("type") != "file" or not name.startswith(root + "/") or name.endswith("/"):
            continue  # skips directory marker objects and sibling prefixes like <root>2/
        rel = name[len(root) + 1:]
        if not _is_hidden(rel):
            files[rel] = info
    if not files:
        raise DiffmixError(f"{uri} holds no files; upload the model folder there "
                           f"(e.g. `aws s3 sync ./model-dir {uri}`) or fix the URI")
    if missing := kind.missing_parts(files):
        raise kind.layout_error(uri, missing)
    if bad := [rel for rel in files if ".." in rel.split("/")]:
        raise DiffmixError(f"{uri} has object keys that would escape the cache folder: {bad[:3]}")

    version = sorted((rel, info.get("size"), str(info.get("ETag") or info.get("LastModified")))
                     for rel, info in files.items())
    key = hashlib.sha256(json.dumps([uri, version]).encode("utf-8")).hexdigest()[:16]
    cache = model_cache_dir()
    final = os.path.join(cache, f"{posixpath.basename(root) or 'model'}-{key}")
    marker = os.path.join(final, STAGED_MARKER)
    if os.path.isfile(marker):
        return final

    from filelock import FileLock

    os.makedirs(cache, exist_ok=True)
    with FileLock(final + ".lock"):
        if os.path.isfile(marker):  # another process finished it while we waited
            return final
        # Holding the lock, any other copy of this key is a leftover of a killed process.
        for leftover in glob.glob(os.path.join(cache, f".staging-{key}-*")) + [final]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".staging-{key}-", dir=cache)  # same filesystem: rename is atomic
        try:
            rels = sorted(files)
            with storage.explained(uri):
                _download_files(fs, [f"{root}/{rel}" for rel in rels], [os.path.join(tmp, rel) for rel in rels])
            for rel in rels:
                if os.path.getsize(os.path.join(tmp, rel)) != files[rel].get("size"):
                    raise DiffmixError(f"staging {uri}: {rel} arrived truncated; retry (the object may "
                                       "have been overwritten during the copy)")
            with open(os.path.join(tmp, STAGED_MARKER), "w", encoding="utf-8") as f:
                sizes = {rel: files[rel].get("size") for rel in rels}
                json.dump({"uri": uri, "staged_at": time.time(), "files": sizes}, f)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------------------------------------
# Writing a folder out
# ---------------------------------------------------------------------------------------------
def refuse_non_empty(out: str, what: str, overwrite: bool, fix: str) -> str:
    """`out` normalized; refused when it holds anything and `overwrite` is off."""
    out = storage.normalize(out)
    if storage.list_dir(out) and not overwrite:
        raise DiffmixError(f"refusing to write {what} into {out}: it is not empty; choose another path or {fix}")
    return out


def copy_folder(source: str, out: str) -> str:
    """Replace `out` (local or s3://) with the non-hidden files of the local folder `source`. A local
    copy lands under a temporary name first, so an interruption leaves nothing that looks like a model."""
    rels = list_files(source)
    storage.remove_tree(out)
    if storage.is_s3(out):
        fs, root = storage.filesystem(out)
        with storage.explained(out):
            fs.put([os.path.join(source, r) for r in rels], [f"{root}/{r}" for r in rels])
        return out
    staging = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
        shutil.copy2(os.path.join(source, rel), os.path.join(staging, rel))
    os.makedirs(staging, exist_ok=True)  # an empty source still gives a folder
    os.rename(staging, out)
    return out
