"""exactly_once.py on its own, on local files, without Ray (milliseconds each): a folder of keyed
Parquet files that a killed run left cut short, with duplicated ids, or with ids outside the plan
ends with every planned id exactly once, or is refused by name."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmix_ray import exactly_once, lease, storage
from diffmix_ray.contracts import MANIFEST_JSON, SUCCESS
from diffmix_ray.errors import DiffmixError


def _write(folder, name: str, ids: list[str], value: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    pq.write_table(pa.table({"pair_id": pa.array(ids, pa.string()), "value": pa.array([value] * len(ids), pa.int64())}),
                   path)
    return path


def _truncate(path: str, keep: int) -> None:
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


def test_a_file_cut_short_is_deleted_and_its_ids_are_not_done(tmp_path):
    folder = str(tmp_path / "rows")
    _write(folder, "a.parquet", ["p0", "p1"])
    cut = _write(folder, "b.parquet", ["p2", "p3"])
    _truncate(cut, os.path.getsize(cut) // 2)  # a writer killed mid-file: no footer
    (tmp_path / "rows" / "notes.txt").write_text("not a row file")

    scan = exactly_once.scan_and_compact(folder)
    assert scan.found == {"a.parquet": ["p0", "p1"]} and scan.removed == ["b.parquet"]
    assert scan.done == {"p0", "p1"} and scan.duplicates == 0
    assert sorted(os.listdir(folder)) == ["a.parquet", "notes.txt"]  # only the unreadable row file went


def test_an_empty_file_of_zero_bytes_is_unreadable_too(tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "empty.parquet").write_bytes(b"")
    scan = exactly_once.scan_and_compact(str(folder))
    assert scan.found == {} and scan.removed == ["empty.parquet"] and not os.listdir(folder)


def test_duplicated_ids_are_kept_once_in_the_first_file_by_name(tmp_path):
    folder = str(tmp_path / "rows")
    _write(folder, "a.parquet", ["p0", "p1"], value=1)
    _write(folder, "b.parquet", ["p1", "p2"], value=2)  # a retried task wrote p1 again
    _write(folder, "c.parquet", ["p0", "p2"], value=3)  # every row a duplicate: the file goes

    scan = exactly_once.scan_and_compact(folder)
    assert scan.duplicates == 3
    assert scan.found == {"a.parquet": ["p0", "p1"], "b.parquet": ["p2"]}
    assert sorted(os.listdir(folder)) == ["a.parquet", "b.parquet"]
    b = pq.read_table(os.path.join(folder, "b.parquet"))
    assert b.column("pair_id").to_pylist() == ["p2"] and b.column("value").to_pylist() == [2]  # rows kept whole
    again = exactly_once.scan_and_compact(folder)  # compaction is final: a second scan finds nothing to do
    assert again.duplicates == 0 and again.found == scan.found


def test_an_id_twice_in_one_file_counts_once_against_the_plan(tmp_path):
    """One write task writes each id once; two copies in one file are counted as found twice, and
    the plan comparison (a set) is what settles them."""
    folder = str(tmp_path / "rows")
    _write(folder, "a.parquet", ["p0", "p0"])
    scan = exactly_once.scan_and_compact(folder)
    assert scan.found == {"a.parquet": ["p0", "p0"]} and scan.duplicates == 0 and scan.done == {"p0"}


def test_settle_names_missing_ids_and_refuses_ids_outside_the_plan(tmp_path):
    folder = str(tmp_path / "rows")
    _write(folder, "a.parquet", ["p0", "p1"])
    _write(folder, "b.parquet", ["p1"])
    scan, missing = exactly_once.settle(folder, {"p0", "p1", "p2"}, "pairs")
    assert missing == {"p2"} and scan.duplicates == 1 and scan.done == {"p0", "p1"}

    _write(folder, "c.parquet", ["x9", "x8"])  # changed by hand: ids that no plan holds
    with pytest.raises(DiffmixError, match=r"holds 2 pairs that are not in the plan .*'x8', 'x9'.*--overwrite"):
        exactly_once.settle(folder, {"p0", "p1", "p2"}, "pairs")
    scan, missing = exactly_once.settle(folder, {"p0", "p1", "p2"}, "pairs", refuse_extra=False)
    assert missing == {"p2"} and {"x8", "x9"} <= scan.done


def _put_rows(s3_env, uri: str, ids: list[str]) -> None:
    """Another process's write (a Ray write task): straight to the server, past this one's s3fs."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"pair_id": pa.array(ids, pa.string())}), sink)
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=sink.getvalue().to_pybytes())


def test_settle_on_s3_sees_the_files_written_since_the_scan(s3_env):
    """A resumed run scans the files there, its write tasks (other processes) add the rest, and
    settle must count them: a listing kept from the scan would call them missing."""
    folder = f"{s3_env.make_bucket()}/out/shards"
    _put_rows(s3_env, f"{folder}/a.parquet", ["p0", "p1"])
    before = exactly_once.scan_and_compact(folder)
    assert before.done == {"p0", "p1"}

    _put_rows(s3_env, f"{folder}/b.parquet", ["p2", "p3"])
    after, missing = exactly_once.settle(folder, {"p0", "p1", "p2", "p3"}, "pairs")
    assert missing == set() and after.done == {"p0", "p1", "p2", "p3"}
    assert sorted(storage.file_sizes(folder)) == ["a.parquet", "b.parquet"]  # the manifest's sizes
    assert storage.exists(f"{folder}/b.parquet")


def test_settle_of_a_folder_that_does_not_exist_misses_everything(tmp_path):
    scan, missing = exactly_once.settle(str(tmp_path / "none"), {"p0"}, "pairs")
    assert scan.found == {} and missing == {"p0"}


def test_failures_are_read_back_once_per_row_still_missing(tmp_path):
    out = str(tmp_path / "out")
    failed = os.path.join(out, exactly_once.FAILED_DIR)
    exactly_once.write_failures(failed, [{"pair_id": "p1", "error": "black"}, {"pair_id": "p2", "error": "nan"}])
    exactly_once.write_failures(failed, [{"pair_id": "p1", "error": "black again"}])  # a retried batch
    exactly_once.write_failures(failed, [])  # nothing failed: no file
    assert len(os.listdir(failed)) == 2
    records = exactly_once.read_failures(out, {"p1", "p3"})  # p2 succeeded on a retry
    assert [r["pair_id"] for r in records] == ["p1"] and records[0]["error"] in ("black", "black again")
    exactly_once.clear_failures(out)
    assert exactly_once.read_failures(out, {"p1"}) == []


def test_disagreeing_rows_are_counted_with_an_example(tmp_path):
    folder = str(tmp_path / "rows")
    _write(folder, "a.parquet", ["p0", "p1"], value=1)
    plan = pa.table({"pair_id": ["p0", "p1"], "value": pa.array([1, 1], pa.int64())})
    assert exactly_once.disagreeing_rows(folder, ["a.parquet"], plan) == (0, "")
    other = pa.table({"pair_id": ["p0", "p1"], "value": pa.array([1, 7], pa.int64())})
    count, example = exactly_once.disagreeing_rows(folder, ["a.parquet"], other)
    assert count == 1 and example == "pair p1: value 1 in the shards, 7 in the plan"


def test_finish_marks_success_only_when_nothing_is_missing(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with pytest.raises(exactly_once.IncompleteOutput, match=r"2 of 5 pairs are missing \(1 failed.*no _SUCCESS") as e:
        exactly_once.finish(out, {"counts": {"missing": 2}}, 2, 5, 1, "summary", "pairs are missing")
    assert e.value.manifest == {"counts": {"missing": 2}}
    assert json.load(open(os.path.join(out, MANIFEST_JSON))) == {"counts": {"missing": 2}}
    assert not os.path.exists(os.path.join(out, SUCCESS))

    lease.acquire(out, "test")
    try:
        assert exactly_once.finish(out, {"counts": {"missing": 0}}, 0, 5, 0, "summary", "pairs are missing")
    finally:
        lease.release(out)
    assert os.path.exists(os.path.join(out, SUCCESS))


def test_an_atomic_table_write_leaves_no_temporary_file(tmp_path):
    uri = str(tmp_path / "t.parquet")
    exactly_once.write_table_atomic(uri, pa.table({"pair_id": ["a"]}))
    exactly_once.write_table_atomic(uri, pa.table({"pair_id": ["b"]}))  # replaces
    assert os.listdir(tmp_path) == ["t.parquet"]
    assert pq.read_table(uri).column("pair_id").to_pylist() == ["b"]
