"""Exactly-once outputs for the Ray Data stages (`generate`, `score`), in one place.

A stage's result is a set of rows, each keyed by a unique id (`pair_id`), written by Ray Data in
APPEND mode as Parquet files in one folder. The run may be killed anywhere and rerun; the folder
must end with every planned id exactly once:

  scan       read the ids of every readable file; a file a killed writer cut short (no footer) is
             deleted, so its rows are simply done again;
  compact    rewrite the files holding an id that an earlier file holds (a retried write task, or a
             task that finished after its driver died), without those rows;
  settle     after the run: scan and compact again, then compare with the plan (missing ids;
             ids that are not in the plan are refused: the folder was changed by hand);
  failures   the per-batch code records rows that failed (one JSON file per batch under failed/);
             the driver reads back those of the rows still missing, one record per row;
  finish     manifest.json, then `_SUCCESS` last and only when nothing is missing.

Ray is imported only inside `write_appending` (the driver's write step): per-batch stage code
imports `write_failures` from here and must stay free of Ray and torch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rich.markup import escape

from . import lease, storage
from .console import console, logger
from .contracts import COL_PAIR_ID, MANIFEST_JSON, SUCCESS
from .errors import DiffmixError

FAILED_DIR = "failed"


class IncompleteOutput(DiffmixError):
    """The run ended without every planned row; `manifest` says which failed and why."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


@dataclass
class Scan:
    """What a folder of keyed Parquet files holds after scanning and compacting it."""

    found: dict[str, list[str]]  # file name -> the ids it holds
    removed: list[str] = field(default_factory=list)  # unreadable files deleted
    duplicates: int = 0  # rows dropped because an earlier file holds their id

    @property
    def done(self) -> set[str]:
        return {i for ids in self.found.values() for i in ids}


def write_table_atomic(uri: str, table: pa.Table) -> None:
    """Locally via a temp name (not *.parquet, so a scan never reads it half-written) and a
    rename; an S3 PUT is atomic already."""
    fs, path = storage.arrow_filesystem(uri)
    with storage.explained(uri):
        tmp = path if storage.is_s3(uri) else f"{path}.tmp-{uuid.uuid4().hex}"
        pq.write_table(table, tmp, filesystem=fs)
        if tmp != path:
            fs.move(tmp, path)


def scan_files(folder: str, key: str = COL_PAIR_ID) -> tuple[dict[str, list[str]], list[str]]:
    """Ids per readable *.parquet file under `folder`; unreadable files (cut short) are deleted
    and listed."""
    found: dict[str, list[str]] = {}
    removed: list[str] = []
    for name in storage.list_dir(folder):
        if not name.endswith(".parquet"):
            continue
        uri = storage.join(folder, name)
        try:
            fs, path = storage.arrow_filesystem(uri)
            found[name] = pq.read_table(path, filesystem=fs, columns=[key]).column(key).to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            logger.warning("%s is unreadable (%s): deleting it, its rows will be done again", uri, e)
            storage.remove_tree(uri)
            removed.append(name)
    return found, removed


def compact_duplicates(folder: str, found: dict[str, list[str]], key: str = COL_PAIR_ID) -> int:
    """Rewrite the files holding an id that an earlier file (by name) already holds, without those
    rows; a file left empty is deleted. Updates `found`; returns the rows dropped."""
    seen: set[str] = set()
    dropped = 0
    for name in sorted(found):
        ids = found[name]
        dup = [i for i in ids if i in seen]
        seen.update(ids)
        if not dup:
            continue
        uri = storage.join(folder, name)
        table = storage.read_parquet(uri)
        kept = table.filter(pc.invert(pc.is_in(table.column(key), value_set=pa.array(dup, pa.string()))))
        if kept.num_rows:
            write_table_atomic(uri, kept)
            found[name] = kept.column(key).to_pylist()
        else:
            storage.remove_tree(uri)
            del found[name]  # gone: the manifest must neither count nor size it
        dropped += len(dup)
    return dropped


def scan_and_compact(folder: str, key: str = COL_PAIR_ID) -> Scan:
    found, removed = scan_files(folder, key)
    return Scan(found, removed, compact_duplicates(folder, found, key))


def settle(folder: str, planned: set[str], what: str, key: str = COL_PAIR_ID,
           refuse_extra: bool = True) -> tuple[Scan, set[str]]:
    """After a run: (scan, planned ids still missing). Refuses ids outside the plan unless told
    not to (scores of an incomplete generate output whose generate, resumed, is redoing a shard)."""
    scan = scan_and_compact(folder, key)
    extra = scan.done - planned
    if extra and refuse_extra:
        raise DiffmixError(f"{folder} holds {len(extra)} {what} that are not in the plan (e.g. {sorted(extra)[:3]}); "
                           "the output was modified by hand: rerun with --overwrite")
    return scan, planned - scan.done


def disagreeing_rows(folder: str, names, plan: pa.Table, key: str = COL_PAIR_ID) -> tuple[int, str]:
    """(rows of the files `names` under `folder` whose plan columns differ from the plan's row of the
    same id, an example): rows another writer put there with another config."""
    columns = [c for c in plan.column_names if c != key]
    tables = [storage.read_parquet(storage.join(folder, n), [key] + columns) for n in sorted(names)]
    if not tables:
        return 0, ""
    rows = pa.concat_tables([t.select([key] + columns) for t in tables], promote_options="permissive")
    joined = rows.join(plan.select([key] + columns), keys=key, right_suffix="__plan")
    differ = {}
    for c in columns:
        a, b = joined.column(c), joined.column(c + "__plan")
        same = pc.fill_null(pc.or_kleene(pc.equal(a, b), pc.and_(pc.is_null(a), pc.is_null(b))), False)
        differ[c] = pc.invert(same)
    bad = differ[columns[0]]
    for c in columns[1:]:
        bad = pc.or_(bad, differ[c])
    count = pc.sum(bad.cast(pa.int64())).as_py() or 0
    if not count:
        return 0, ""
    c = next(c for c in columns if pc.any(differ[c]).as_py())
    i = pc.index(differ[c], True).as_py()
    show = lambda v: f"{v:.6g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)  # noqa: E731
    return count, (f"pair {joined.column(key)[i].as_py()}: {c} {show(joined.column(c)[i].as_py())} in the shards, "
                   f"{show(joined.column(c + '__plan')[i].as_py())} in the plan")


def write_failures(failed_uri: str, records: list[dict]) -> None:
    """Per-batch code: record failed rows ({key: id, "error": why}) as one JSON file."""
    if records:
        storage.write_json_atomic(storage.join(failed_uri, f"{uuid.uuid4().hex}.json"), records)


def read_failures(out: str, missing: set[str], key: str = COL_PAIR_ID) -> list[dict]:
    """Failure records of the rows still missing, one per row: a retried task records its
    batch's failures again, and a row that failed once may have succeeded on a retry."""
    records: dict[str, dict] = {}
    for name in storage.list_dir(storage.join(out, FAILED_DIR)):
        if name.endswith(".json"):
            for rec in storage.read_json(storage.join(out, FAILED_DIR, name)):
                if rec[key] in missing:
                    records.setdefault(rec[key], rec)
    return [records[k] for k in sorted(records)]


def clear_failures(out: str) -> None:
    """Before a run: failures are recorded again if they recur."""
    storage.remove_tree(storage.join(out, FAILED_DIR))


def files_bytes(folder: str, names) -> int:
    fs, root = storage.filesystem(folder)
    with storage.explained(folder):
        return sum(fs.size(f"{root}/{n}") for n in names)


def finish(out: str, manifest: dict, missing: int, planned: int, failed: int, summary: str, what: str) -> dict:
    """Write manifest.json, then `_SUCCESS` when nothing is missing. Otherwise raise
    IncompleteOutput (the CLI, and a Ray job around it, exits non-zero: the output is unusable)."""
    storage.write_json_atomic(storage.join(out, MANIFEST_JSON), manifest)
    if missing:
        console.print(summary, style="yellow")
        raise IncompleteOutput(f"{missing} of {planned} {what} ({failed} failed, listed in "
                               f"{storage.join(out, MANIFEST_JSON)}): no {SUCCESS} was written. "
                               "Rerun the same command to retry them.", manifest)
    lease.check_held(out)
    storage.write_text_atomic(storage.join(out, SUCCESS), "")
    console.print(f"[green]{escape(summary)}[/green] -> {escape(out)}", markup=True)
    return manifest


def write_appending(ds, folder: str, prefix: str, rows_per_file: int, num_cpus: float) -> None:
    """Write a Ray Dataset as Parquet files of at least `rows_per_file` rows into `folder`, beside
    what is there: files named `<prefix>-<write uuid>-<task>`, so no run overwrites another's.
    A minimum, not an exact count: whole blocks (multiples of the batch size) are not cut, so a
    file holds rows_per_file rounded up to whole blocks rather than rows_per_file + a few."""
    from ray.data import SaveMode
    from ray.data.datasource import FilenameProvider

    class Names(FilenameProvider):
        # Ray 2.60 asks only get_filename_for_task and appends "-{i}.parquet"; APPEND mode
        # requires the whole write_uuid in the name.
        def get_filename_for_task(self, write_uuid, task_index):
            return f"{prefix}-{write_uuid}-{task_index:06d}"

    fs, path = storage.arrow_filesystem(folder)
    storage.makedirs(folder)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file, filename_provider=Names(),
                     mode=SaveMode.APPEND, ray_remote_args={"num_cpus": num_cpus})


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
