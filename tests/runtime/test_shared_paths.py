"""What each node reports about the run's local paths (runtime/shared_paths.py), without Ray; the
refusal on a real multi-node cluster is in tests/cluster/test_nodes.py."""

from __future__ import annotations

import os

from diffmix_ray.runtime import shared_paths
from diffmix_ray.runtime.shared_paths import TEST_ROOT_ENV, listing_digest, look_here


def _folder(root, files: dict[str, bytes]) -> str:
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return str(root)


def test_copies_look_the_same_and_differences_do_not(tmp_path):
    a = _folder(tmp_path / "a", {"dataset.json": b"{}", "x.parquet": b"1234"})
    b = _folder(tmp_path / "b", {"dataset.json": b"{}", "x.parquet": b"1234"})
    assert listing_digest(a) == listing_digest(b)  # an identical copy on each node is the same input
    _folder(tmp_path / "b", {"x.parquet": b"12345"})
    assert listing_digest(a) != listing_digest(b)
    assert listing_digest(str(tmp_path / "missing")) is None
    _folder(tmp_path / "a", {".diffmix-visible-123": b"token"})  # another run's marker is not content
    assert listing_digest(a) == listing_digest(str(_folder(tmp_path / "c", {"dataset.json": b"{}",
                                                                            "x.parquet": b"1234"})))


def test_a_node_with_a_disk_of_its_own_sees_neither_inputs_nor_the_marker(tmp_path, monkeypatch):
    data = _folder(tmp_path / "data", {"dataset.json": b"{}"})
    out = _folder(tmp_path / "out", {".diffmix-visible-t": b"t"})
    marker = os.path.join(out, ".diffmix-visible-t")
    seen = look_here([data], marker, "t")
    assert seen["seen"] == [listing_digest(data)] and seen["marker"] is True and seen["node"] == "this machine"
    assert look_here([data], marker, "other")["marker"] is False  # another run's marker
    monkeypatch.setenv(TEST_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert look_here([data], marker, "t") == {"node": "this machine", "seen": [None], "marker": False}


def test_only_local_paths_that_exist_are_checked(tmp_path):
    assert shared_paths._local("s3://bucket/data") is None
    assert shared_paths._local("tiny") is None  # a model preset, not a path
    assert shared_paths._local(None) is None
    assert shared_paths._local(str(tmp_path)) == str(tmp_path)
