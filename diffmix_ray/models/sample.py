"""The `sample` models: a Stable-Diffusion-shaped model and a CLIP, small but trained (by
`diffmix-ray model train-sample`, sample_train.py) on the sample world, shipped inside the package.

`--model sample` and `--clip sample` name the shipped folders; they load like any SD 1.5 or CLIP
checkpoint folder (the same classes and layout). Each folder holds a training record
(`sample_model.json`: the command, seed, versions, losses and wall time that made it, and the sha256 of
every file). Every folder with such a record, shipped or retrained, is checked against it whenever it is
resolved: a missing or altered file is refused, by name, before anything loads it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DiffmixError

SAMPLE_SPEC = "sample"
RECORD = "sample_model.json"
SHIPPED = Path(__file__).resolve().parent / "sample_weights"  # sd/ and clip/
SD_DIR, CLIP_DIR = "sd", "clip"
RETRAIN = "diffmix-ray model train-sample OUT"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def shipped_dir(kind: str) -> str:
    """The shipped folder of `kind` (sd | clip)."""
    return str(SHIPPED / {"sd": SD_DIR, "clip": CLIP_DIR}[kind])


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_files(folder: str) -> list[str]:
    """Relative POSIX paths of the folder's non-hidden files other than the record, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != RECORD and not any(p.startswith(".") for p in rel.split("/")):
                found.append(rel)
    return sorted(found)


def files_fingerprint(files: dict[str, str]) -> str:
    """One sha256 over every file's name and sha256: the fingerprint a record keeps."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()


def write_record(folder: str, record: dict) -> dict:
    """Hash every file of `folder` into `record` (files, fingerprint) and write it as RECORD, last."""
    files = {rel: file_sha256(os.path.join(folder, rel)) for rel in _content_files(folder)}
    record = dict(record, files=files, fingerprint=files_fingerprint(files))
    with open(os.path.join(folder, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return record


def read_record(folder: str) -> dict | None:
    path = os.path.join(folder, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        files = record["files"]
        if not isinstance(files, dict) or record["fingerprint"] != files_fingerprint(files):
            raise ValueError("its file list does not give its fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DiffmixError(f"{path} is not a valid sample-model record ({e}); restore the folder, or retrain it "
                           f"with `{RETRAIN}`") from None
    return record


def verify(folder: str, what: str | None = None) -> dict | None:
    """Check `folder` against its record, if it has one; returns the record (None without one). A file the
    record lists that is missing or whose sha256 differs, or a weight file it does not list, is refused
    by name."""
    record = read_record(folder)
    if record is None:
        return None
    what = what or folder
    for rel, digest in sorted(record["files"].items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise DiffmixError(f"{what}: {rel} is missing (its training record {RECORD} lists it); restore the "
                               f"folder (reinstall diffmix-ray for the shipped one) or retrain with `{RETRAIN}`")
        if file_sha256(path) != digest:
            raise DiffmixError(f"{what}: {rel} was altered (its sha256 differs from the one {RECORD} recorded "
                               f"when it was trained); restore the file or retrain with `{RETRAIN}`")
    extra = [rel for rel in _content_files(folder) if rel not in record["files"] and rel.endswith(_WEIGHT_SUFFIXES)]
    if extra:
        raise DiffmixError(f"{what}: {extra[0]} is not one of the files its training record {RECORD} lists; "
                           "remove it (a loader could pick it up instead of the trained weights)")
    return record


def shipped(kind: str) -> str:
    """The verified path of the shipped `sample` folder of `kind` (sd | clip)."""
    path = shipped_dir(kind)
    if not os.path.isfile(os.path.join(path, RECORD)):
        raise DiffmixError(f"the shipped sample {'model' if kind == 'sd' else 'CLIP'} is not in {path} (no {RECORD}); "
                           f"reinstall diffmix-ray, or retrain it with `{RETRAIN}` and pass the folder it writes")
    verify(path, f"the shipped sample {'model' if kind == 'sd' else 'CLIP'} ({path})")
    return path
