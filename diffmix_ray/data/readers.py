"""Readers for raw dataset layouts. Each one lists a source (local path or s3:// URI) into a
`RawListing`: the class names in label order and one `RawItem` per image, with its split when the
source defines one. Bytes are fetched later, in parallel, by `prepare`."""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DiffmixError
from ..images import is_image_name
from .splits import reference_halves

SPLIT_DIR_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FLOWERS102_CLASSES_FILE = "flowers102_classes.txt"


@dataclass(frozen=True)
class RawItem:
    image_id: str  # stable and unique within the dataset
    label: int
    split: str | None  # None: the source does not say; prepare assigns it
    where: str  # full path/URI, for error messages and for fetching
    data: bytes | None = None  # inline bytes (Parquet sources); None -> fetch `where`


@dataclass
class RawListing:
    classes: list[str]
    items: list[RawItem]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) found while listing
    ignored: list[str] = field(default_factory=list)  # hidden files and files outside class folders
    default_super_class: str | None = None


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else ""


def _is_dir(entry: dict) -> bool:
    """A folder, or (local sources) a symbolic link to one: fsspec lists those as "other"."""
    return entry["type"] == "directory" or bool(entry.get("islink") and os.path.isdir(entry["name"]))


def inside(path: str, root: str) -> bool:
    """Whether the local `path`, every link resolved, lies within `root` (resolved too)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _ls_dirs(fs, path: str, source: str, listing: "RawListing") -> list[str]:
    """The sub-folders of `path` that can hold classes. Hidden ones (.ipynb_checkpoints, .git) are
    ignored and listed; a link to a folder is followed when it stays inside the source, and refused
    when it leads outside (an input must never be read from elsewhere unasked)."""
    found = []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/")
        if not _is_dir(entry):
            continue
        if posixpath.basename(name).startswith("."):
            listing.ignored.append(_display(source, name))
            continue
        if entry.get("islink") and not inside(name, storage.normalize(source)):
            raise DiffmixError(f"class folder {posixpath.basename(name)!r} in {source} is a symbolic link to "
                               f"{os.path.realpath(name)}, outside --source: links are followed only inside the "
                               "source; copy the folder in, or point --source at a folder that holds both")
        found.append(name)
    return sorted(found)


def _display(source: str, fs_path: str) -> str:
    return ("s3://" + fs_path) if storage.is_s3(source) else fs_path


def read_imagefolder(source: str) -> RawListing:
    """`root/<class>/*` or `root/{train,val,test}/<class>/*` (class folders may nest subfolders)."""
    fs, root = storage.filesystem(source)
    with storage.explained(source):
        if not fs.isdir(root):
            raise DiffmixError(f"--source {source} is not a directory; an imagefolder source is "
                               "root/<class>/<image> or root/{train,val,test}/<class>/<image>")
        listing = RawListing(classes=[], items=[])
        top = _ls_dirs(fs, root, source, listing)
        top_names = [posixpath.basename(d) for d in top]
        split_dirs = {n: SPLIT_DIR_NAMES[n.lower()] for n in top_names if n.lower() in SPLIT_DIR_NAMES}
        if split_dirs and len(split_dirs) == len(top_names):
            if "train" not in split_dirs.values():
                raise DiffmixError(f"{source} has split folders {sorted(split_dirs)} but no train/; "
                                   "add a train/ folder (the stages fine-tune and train on it)")
            groups = [(split_dirs[n], posixpath.join(root, n)) for n in top_names]
        elif split_dirs:
            raise DiffmixError(f"{source} mixes split folders {sorted(split_dirs)} with class folders "
                               f"{sorted(set(top_names) - set(split_dirs))}; use one layout or the other")
        else:
            groups = [(None, root)]
        class_dirs: dict[str, list[tuple[str | None, str]]] = {}
        for split, base in groups:
            for d in _ls_dirs(fs, base, source, listing):
                class_dirs.setdefault(posixpath.basename(d), []).append((split, d))
        if not class_dirs:
            raise DiffmixError(f"{source} has no class folders; expected root/<class>/<image files>")
        classes = sorted(class_dirs)
        listing.classes = classes
        for label, name in enumerate(classes):
            n_images = 0
            for split, d in class_dirs[name]:
                for path in _files_under(fs, d, source):
                    base = posixpath.basename(path)
                    rel = _rel(path, root)
                    if base.startswith(".") or "/." in "/" + rel:
                        listing.ignored.append(_display(source, path))
                    elif not is_image_name(base):
                        listing.bad.append((_display(source, path), "not an image file (extension "
                                            f"{posixpath.splitext(base)[1] or 'none'}); remove it"))
                    else:
                        listing.items.append(RawItem(rel, label, split, _display(source, path)))
                        n_images += 1
            if n_images == 0:
                raise DiffmixError(f"class folder {name!r} in {source} holds no images "
                                   "(.jpg/.jpeg/.png/.webp/.bmp); add images or remove the folder")
        for path in fs.ls(root, detail=True):
            if not _is_dir(path):
                listing.ignored.append(_display(source, path["name"]))
    return listing


def _files_under(fs, folder: str, source: str) -> list[str]:
    """Every file below a class folder, sorted; locally through links to folders too (each folder
    once: a link cycle ends there). Whether a file's link stays inside the source is prepare's check."""
    if storage.is_s3(source):
        return sorted(fs.find(folder))
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [posixpath.join(top, f) for f in files]
    return sorted(found)


def _read_table_lines(fs, path: str, source: str, what: str) -> list[list[str]]:
    if not fs.exists(path):
        raise DiffmixError(f"{what} is missing from {source} (expected {posixpath.basename(path)}); "
                           "point --source at the folder that holds the official metadata files")
    text = fs.cat_file(path).decode("utf-8")
    return [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]


def read_cub(source: str) -> RawListing:
    """Official CUB-200-2011 layout with its official train/test split."""
    fs, root = storage.filesystem(source)
    with storage.explained(source):
        if not fs.exists(posixpath.join(root, "images.txt")) and fs.exists(
                posixpath.join(root, "CUB_200_2011", "images.txt")):
            root = posixpath.join(root, "CUB_200_2011")  # the official tarball's top folder
        images = _read_table_lines(fs, posixpath.join(root, "images.txt"), source, "images.txt")
        labels = dict(_read_table_lines(fs, posixpath.join(root, "image_class_labels.txt"), source,
                                        "image_class_labels.txt"))
        is_train = dict(_read_table_lines(fs, posixpath.join(root, "train_test_split.txt"), source,
                                          "train_test_split.txt"))
        class_rows = _read_table_lines(fs, posixpath.join(root, "classes.txt"), source, "classes.txt")
    classes = []
    for idx, (num, raw_name) in enumerate(class_rows, start=1):
        if int(num) != idx:
            raise DiffmixError(f"classes.txt in {source} is not numbered 1..N in order (line {idx}: {num})")
        # "001.Black_footed_Albatross" -> "Black footed Albatross": the name goes into prompts.
        classes.append(raw_name.split(".", 1)[-1].replace("_", " ").strip())
    listing = RawListing(classes=classes, items=[], default_super_class="bird")
    seen: set[str] = set()
    for image_num, rel in images:
        if image_num in seen:
            raise DiffmixError(f"images.txt in {source} lists image id {image_num} twice; "
                               "the metadata is damaged, re-extract the official archive")
        seen.add(image_num)
        if image_num not in labels or image_num not in is_train:
            raise DiffmixError(f"image id {image_num} ({rel}) has no entry in image_class_labels.txt "
                               f"or train_test_split.txt in {source}; re-extract the official archive")
        label = int(labels[image_num]) - 1
        if not 0 <= label < len(classes):
            raise DiffmixError(f"image {rel} in {source} has class {label + 1}, outside 1..{len(classes)}")
        split = "train" if is_train[image_num].strip() == "1" else "test"
        listing.items.append(RawItem(rel, label, split, _display(source, posixpath.join(root, "images", rel))))
    return listing


def _flowers_class_names() -> list[str]:
    from importlib import resources

    text = resources.files("diffmix_ray.data").joinpath(FLOWERS102_CLASSES_FILE).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_flowers102(source: str, split: str = "official", seed: int = 0) -> RawListing:
    """Oxford Flowers-102: jpg/, imagelabels.mat, and setid.mat for the official trn/val/tst ids.
    split="reference" is the Diff-Mix code's split instead: every image, 50/50 per class, seeded
    (train/test, no val; `prepare` carves val from train when asked); it needs no setid.mat."""
    import scipy.io

    fs, root = storage.filesystem(source)

    def load_mat(name: str) -> dict:
        path = posixpath.join(root, name)
        with storage.explained(source):
            if not fs.exists(path):
                raise DiffmixError(f"{name} is missing from {source}; a flowers102 source holds jpg/, "
                                   "imagelabels.mat and (for the official split) setid.mat")
            raw = fs.cat_file(path)
        try:
            return scipy.io.loadmat(io.BytesIO(raw))
        except Exception as e:  # noqa: BLE001 - scipy raises several unrelated types on bad files
            raise DiffmixError(f"{name} in {source} is not a readable MATLAB file ({e})") from e

    labels = load_mat("imagelabels.mat").get("labels")
    if labels is None:
        raise DiffmixError(f"imagelabels.mat in {source} lacks 'labels'")
    labels = labels.ravel().astype(int)
    names = _flowers_class_names()
    if labels.min() < 1 or labels.max() > len(names):
        raise DiffmixError(f"imagelabels.mat in {source} has labels outside 1..{len(names)}")
    listing = RawListing(classes=names, items=[], default_super_class="flower")

    def item(num: int, split_name: str) -> RawItem:
        return RawItem(f"image_{num:05d}", int(labels[num - 1]) - 1, split_name,
                       _display(source, posixpath.join(root, f"jpg/image_{num:05d}.jpg")))

    if split == "reference":
        # The reference lists jpg/*.jpg sorted (image_00001 first) against imagelabels.mat: every
        # labelled image, in number order within each class. Splitting the listing, not the images
        # that decode, means a skipped bad file never moves another image across the split.
        per_class: list[list[str]] = [[] for _ in names]
        for num in range(1, len(labels) + 1):
            per_class[int(labels[num - 1]) - 1].append(f"image_{num:05d}")
        split_of = reference_halves(per_class, seed)
        listing.items = [item(num, split_of[f"image_{num:05d}"]) for num in range(1, len(labels) + 1)]
        return listing
    setid = load_mat("setid.mat")
    if not all(k in setid for k in ("trnid", "valid", "tstid")):
        raise DiffmixError(f"setid.mat in {source} lacks 'trnid'/'valid'/'tstid'")
    for split_name, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for num in sorted(int(i) for i in setid[key].ravel()):
            if not 1 <= num <= len(labels):
                raise DiffmixError(f"setid.mat in {source} names image {num}, outside 1..{len(labels)}")
            listing.items.append(item(num, split_name))
    return listing


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """Class names from a Hugging Face `datasets` ClassLabel feature, when the file carries one."""
    import json

    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return list(names) if names else None


def _check_image_column(kind: pa.DataType, column: str, where: str) -> None:
    """Encoded image bytes: binary, or the {bytes, path} struct Hugging Face `datasets` writes."""
    binary = (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
              or (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(kind)))
    if binary or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                  and _check_binary(kind.field("bytes").type)):
        return
    raise DiffmixError(f"--image-column {column!r} of {where} holds {kind}, not encoded image bytes (binary, or a "
                       "{bytes, path} struct as Hugging Face datasets write it); point --image-column at the "
                       "column of JPEG/PNG bytes")


def _check_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def read_parquet_table(source: str, image_column: str, label_column: str, split_column: str | None,
                       id_column: str | None, class_names: list[str] | None) -> RawListing:
    """A Parquet file or folder of files with an image column (bytes, or a {bytes, path} struct as
    Hugging Face `datasets` writes it) and an integer label column."""
    fs, path = storage.filesystem(source)
    with storage.explained(source):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
        if not files:
            raise DiffmixError(f"no .parquet files under {source}")
        listing = RawListing(classes=[], items=[])
        names = class_names
        for file in files:
            with storage.explained(_display(source, file)):  # a damaged file is named, not the folder
                pf = pq.ParquetFile(fs.open(file, "rb"))
            cols = pf.schema_arrow.names
            for flag, col in (("--image-column", image_column), ("--label-column", label_column),
                              ("--split-column", split_column), ("--id-column", id_column)):
                if col is not None and col not in cols:
                    raise DiffmixError(f"{flag} {col!r} is not a column of {_display(source, file)} "
                                       f"(columns: {cols})")
            _check_image_column(pf.schema_arrow.field(image_column).type, image_column, _display(source, file))
            names = names or _hf_class_names(pf.schema_arrow, label_column)
            wanted = [c for c in (image_column, label_column, split_column, id_column) if c]
            with storage.explained(_display(source, file)):
                table = pf.read(columns=list(dict.fromkeys(wanted)))
            stem = posixpath.splitext(posixpath.basename(file))[0]
            images = table.column(image_column).to_pylist()
            labels = table.column(label_column).to_pylist()
            splits = table.column(split_column).to_pylist() if split_column else [None] * len(labels)
            ids = table.column(id_column).to_pylist() if id_column else [f"{stem}-{i:08d}" for i in range(len(labels))]
            for row, (img, label, split, image_id) in enumerate(zip(images, labels, splits, ids)):
                where = f"{_display(source, file)} row {row}"
                if isinstance(img, dict):
                    img = img.get("bytes")  # HF Image feature; path-only rows have no bytes to read
                if label is None or isinstance(label, bool) or not isinstance(label, int):
                    raise DiffmixError(f"{where}: label {label!r} in --label-column {label_column!r} "
                                       "is not an integer class index")
                if split is not None:
                    split = SPLIT_DIR_NAMES.get(str(split).lower())
                    if split is None:
                        raise DiffmixError(f"{where}: split {splits[row]!r} is not one of train/val/test")
                listing.items.append(RawItem(str(image_id), int(label), split, where, img or b""))
    n_classes = len(names) if names else (max((i.label for i in listing.items), default=-1) + 1)
    for item in listing.items:
        if not 0 <= item.label < n_classes:
            raise DiffmixError(f"{item.where}: label {item.label} is out of range 0..{n_classes - 1}"
                               + (f" ({n_classes} class names known)" if names else "")
                               + "; fix the label column or pass --class-names with every class")
    listing.classes = list(names) if names else [f"class_{i:03d}" for i in range(n_classes)]
    return listing


def detect_format(source: str) -> tuple[str | None, str]:
    """(the raw format `source` looks like, the evidence), from the files each reader needs; None
    when it looks like none of them. Used to say "this is not a CUB folder" before any work."""
    fs, root = storage.filesystem(source)
    with storage.explained(source):
        if not fs.exists(root):
            return None, "it does not exist"
        if not fs.isdir(root):
            return ("parquet", "a .parquet file") if root.endswith(".parquet") else (None, "a file, not a folder")
        for base in (root, posixpath.join(root, "CUB_200_2011")):
            if fs.exists(posixpath.join(base, "images.txt")):
                return "cub", f"it holds {posixpath.relpath(posixpath.join(base, 'images.txt'), root)}"
        if fs.exists(posixpath.join(root, "imagelabels.mat")):
            return "flowers102", "it holds imagelabels.mat"
        entries = fs.ls(root, detail=True)
        if any(e["name"].endswith(".parquet") for e in entries if e["type"] != "directory"):
            return "parquet", "it holds .parquet files"
        dirs = [e for e in entries if e["type"] == "directory"]
        for d in dirs[:3]:  # Hugging Face datasets keep their files under data/
            if any(e["name"].endswith(".parquet") for e in fs.ls(d["name"], detail=True)):
                return "parquet", f"it holds .parquet files under {posixpath.basename(d['name'].rstrip('/'))}/"
        if dirs:
            return "imagefolder", f"it holds {len(dirs)} folder(s) ({posixpath.basename(dirs[0]['name'].rstrip('/'))}, ...)"
    return None, "it holds no folders, no .parquet files and none of the CUB/Flowers-102 metadata files"
