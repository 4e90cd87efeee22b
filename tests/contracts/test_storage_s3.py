"""Storage against a real S3-protocol server (moto on 127.0.0.1): round trips and clear errors."""

from __future__ import annotations

import os

import pytest

from diffmix_ray import canonical, storage
from diffmix_ray.data.prepare import PrepareConfig, prepare
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def test_prepare_local_source_to_s3_and_back(tmp_path, s3_env):
    bucket = s3_env.make_bucket()
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 5, "b": 5})
    local = prepare(PrepareConfig("imagefolder", src, super_class="x"), str(tmp_path / "local"), show_progress=False)
    remote = prepare(PrepareConfig("imagefolder", src, super_class="x"), f"{bucket}/ds", show_progress=False)
    assert remote.fingerprint == local.fingerprint
    ds = canonical.open_dataset(f"{bucket}/ds/")
    assert ds.read_split("train").equals(canonical.open_dataset(str(tmp_path / "local")).read_split("train"))
    # rerun with the same config is a no-op; another config is refused
    assert prepare(PrepareConfig("imagefolder", src, super_class="x"), f"{bucket}/ds").fingerprint == local.fingerprint
    with pytest.raises(DiffmixError, match="different config"):
        prepare(PrepareConfig("imagefolder", src, super_class="y"), f"{bucket}/ds")


def test_prepare_from_s3_source(tmp_path, s3_env):
    bucket = s3_env.make_bucket()
    src = fx.make_cub(str(tmp_path / "CUB"), num_classes=2, per_class=4)
    fs, root = storage.filesystem(f"{bucket}/raw/CUB")
    fs.put(src, root, recursive=True)
    info = prepare(PrepareConfig("cub", f"{bucket}/raw/CUB", val_fraction=0.0), str(tmp_path / "out"),
                   show_progress=False)
    assert info.class_counts("train") == [2, 2] and info.source["uri"] == f"{bucket}/raw/CUB"


def test_atomic_json_on_s3(s3_env):
    bucket = s3_env.make_bucket()
    storage.write_json_atomic(f"{bucket}/x/meta.json", {"k": [1, 2]})
    assert storage.read_json(f"{bucket}/x/meta.json") == {"k": [1, 2]}
    assert storage.list_dir(f"{bucket}/x") == ["meta.json"]


def test_missing_bucket_is_a_clear_error(tmp_path, s3_env):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 2})
    with pytest.raises(DiffmixError, match="S3 bucket 'no-such-bucket' does not exist.*create it or fix the URI"):
        prepare(PrepareConfig("imagefolder", src, super_class="x"), "s3://no-such-bucket/ds")


def test_missing_credentials_is_a_clear_error(tmp_path, s3_env, monkeypatch):
    bucket = s3_env.make_bucket()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 2})
    with pytest.raises(DiffmixError, match="no AWS credentials found for s3://.*AWS_ACCESS_KEY_ID"):
        prepare(PrepareConfig("imagefolder", src, super_class="x"), f"{bucket}/ds")


def test_secrets_never_reach_outputs(tmp_path, s3_env):
    bucket = s3_env.make_bucket()
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3})
    prepare(PrepareConfig("imagefolder", src, super_class="x"), f"{bucket}/ds", show_progress=False)
    fs, root = storage.filesystem(f"{bucket}/ds")
    for path in fs.find(root):
        if path.endswith(".json"):
            text = fs.cat_file(path).decode()
            assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "AWS_SECRET" not in text


def test_failed_prepare_into_s3_does_not_block_the_corrected_rerun(tmp_path, s3_env):
    bucket = s3_env.make_bucket()
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3, "b": 3})
    fx.write(os.path.join(src, "b", "empty.jpg"), b"")
    with pytest.raises(DiffmixError, match="empty.jpg: empty file"):
        prepare(PrepareConfig("imagefolder", src, super_class="x"), f"{bucket}/ds", show_progress=False)
    assert storage.list_dir(f"{bucket}/ds") == ["_run.json"]
    info = prepare(PrepareConfig("imagefolder", src, super_class="x", on_bad_image="skip"), f"{bucket}/ds",
                   show_progress=False)
    assert info.skipped["bad_files"] == 1

