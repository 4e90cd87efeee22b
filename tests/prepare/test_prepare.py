"""prepare: every raw format, split carving, derived subsets, output ownership, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffmix_ray import canonical, storage
from diffmix_ray.cli import app
from diffmix_ray.data import splits
from diffmix_ray.data.prepare import DeriveConfig, PrepareConfig, derive, prepare
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def _ids(ds, split):
    return ds.read_split(split, columns=["image_id"]).column("image_id").to_pylist()


def test_imagefolder_flat_carves_stratified_val(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"alpha": 10, "beta": 10, "gamma": 5})
    info = prepare(PrepareConfig("imagefolder", src, super_class="thing", val_fraction=0.2), str(tmp_path / "out"))
    assert info.classes == ["alpha", "beta", "gamma"]
    assert info.class_counts("train") == [8, 8, 4]
    assert info.class_counts("val") == [2, 2, 1]
    assert "test" not in info.counts
    ds = canonical.open_dataset(str(tmp_path / "out"))
    table = ds.read_split("train")
    assert table.schema.field("label").type == "int32"
    img = Image.open(io.BytesIO(table.column("image")[0].as_py()))
    assert img.mode == "RGB" and img.format == "JPEG"
    assert set(_ids(ds, "train")).isdisjoint(_ids(ds, "val"))


def test_imagefolder_with_split_folders(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 6, "b": 6}, splits={"train": 1, "val": 1, "test": 1})
    info = prepare(PrepareConfig("imagefolder", src, super_class="thing"), str(tmp_path / "out"))
    assert info.class_counts("train") == [2, 2]
    assert info.class_counts("val") == [2, 2]  # the source's own val split: nothing carved
    assert info.class_counts("test") == [2, 2]
    ds = canonical.open_dataset(str(tmp_path / "out"))
    assert all(i.startswith("train/") for i in _ids(ds, "train"))


def test_cub_official_split_and_names(tmp_path):
    src = fx.make_cub(str(tmp_path / "CUB"), num_classes=3, per_class=6)
    info = prepare(PrepareConfig("cub", src, val_fraction=0.0), str(tmp_path / "out"))
    assert info.super_class == "bird"
    assert info.classes == ["Bird Number 1", "Bird Number 2", "Bird Number 3"]
    assert info.class_counts("train") == [3, 3, 3] and info.class_counts("test") == [3, 3, 3]


def test_flowers102_official_split(tmp_path):
    src = fx.make_flowers102(str(tmp_path / "flowers"), per_class=3)
    info = prepare(PrepareConfig("flowers102", src), str(tmp_path / "out"))
    assert info.num_classes == 102 and info.classes[0] == "pink primrose" and info.super_class == "flower"
    assert info.split_size("train") == info.split_size("val") == info.split_size("test") == 102


def test_parquet_hf_struct_names_and_splits(tmp_path):
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    parts = ["train"] * 6 + ["test"] * 3
    src = fx.make_parquet(str(tmp_path / "src" / "data.parquet"), labels, hf_struct=True,
                          names=["cat", "dog", "owl"], ids=[f"u{i}" for i in range(9)], splits=parts)
    info = prepare(PrepareConfig("parquet", src, super_class="animal", image_column="img", label_column="target",
                                 split_column="part", id_column="uid", val_fraction=0.0), str(tmp_path / "out"))
    assert info.classes == ["cat", "dog", "owl"]
    assert info.class_counts("train") == [2, 2, 2] and info.class_counts("test") == [1, 1, 1]
    assert sorted(_ids(canonical.open_dataset(str(tmp_path / "out")), "test")) == ["u6", "u7", "u8"]


def test_same_inputs_give_byte_identical_output(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 7, "b": 9})

    def digest(out):
        h = {}
        for dirpath, _, files in os.walk(out):
            for f in files:
                if f != "_run.json":
                    p = os.path.join(dirpath, f)
                    h[os.path.relpath(p, out)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        return h

    cfg = PrepareConfig("imagefolder", src, super_class="x", val_fraction=0.3, seed=5)
    prepare(cfg, str(tmp_path / "o1"))
    prepare(cfg, str(tmp_path / "o2"))
    assert digest(str(tmp_path / "o1")) == digest(str(tmp_path / "o2"))


@pytest.fixture
def parent(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {f"c{i}": 12 for i in range(5)})
    out = str(tmp_path / "parent")
    prepare(PrepareConfig("imagefolder", src, super_class="x", val_fraction=0.25, test_fraction=0.25), out)
    return out


def test_few_shot_exact_counts_and_lineage(parent, tmp_path):
    info = derive(DeriveConfig(parent, shots=2, seed=1), str(tmp_path / "k2"))
    par = canonical.open_dataset(parent)
    assert info.class_counts("train") == [2] * 5
    assert info.counts["val"] == par.info.counts["val"] and info.counts["test"] == par.info.counts["test"]
    assert info.parent_fingerprint == par.info.fingerprint
    assert info.subset["shots"] == 2 and info.subset["seed"] == 1
    child = canonical.open_dataset(str(tmp_path / "k2"))
    assert set(_ids(child, "train")) <= set(_ids(par, "train"))
    # determinism: same seed -> same files byte for byte; another seed -> another subset
    derive(DeriveConfig(parent, shots=2, seed=1), str(tmp_path / "k2b"))
    for f in info.files["train"]:
        assert (tmp_path / "k2" / "images" / f).read_bytes() == (tmp_path / "k2b" / "images" / f).read_bytes()
    derive(DeriveConfig(parent, shots=2, seed=2), str(tmp_path / "k2c"))
    assert set(_ids(canonical.open_dataset(str(tmp_path / "k2c")), "train")) != set(_ids(child, "train"))


def test_geometric_long_tail_counts_follow_formula(parent, tmp_path):
    # `reference` is the default construction now (tests/prepare/test_protocol.py); geometric stays selectable
    info = derive(DeriveConfig(parent, imbalance_ratio=6.0, seed=3, long_tail="geometric"), str(tmp_path / "lt"))
    n_max = 6  # 12 per class minus 3 val and 3 test
    expected = splits.long_tail_targets(5, n_max, 6.0, 3)
    assert sorted(expected, reverse=True) == [6, 3, 2, 1, 1]  # floor(6 * 6^(-i/4)), at least 1
    assert info.class_counts("train") == expected
    assert info.subset["targets"] == expected and info.subset["construction"] == "geometric"


def test_long_tail_order_depends_on_seed():
    a = splits.long_tail_targets(10, 30, 100.0, 0)
    b = splits.long_tail_targets(10, 30, 100.0, 1)
    assert sorted(a) == sorted(b) and a != b
    assert max(a) == 30 and min(a) == 1  # n_max and n_max / R, floored, at least 1


def test_rerun_same_config_is_a_noop_and_other_config_is_refused(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4})
    out = str(tmp_path / "out")
    first = prepare(PrepareConfig("imagefolder", src, super_class="x"), out)
    again = prepare(PrepareConfig("imagefolder", src, super_class="x"), out)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(DiffmixError, match="different config.*--overwrite"):
        prepare(PrepareConfig("imagefolder", src, super_class="x", seed=9), out)
    replaced = prepare(PrepareConfig("imagefolder", src, super_class="x", seed=9, val_fraction=0.5), out, overwrite=True)
    assert replaced.config["seed"] == 9


def test_refuses_foreign_non_empty_output(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3})
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DiffmixError, match="not written by diffmix-ray"):
        prepare(PrepareConfig("imagefolder", str(src), super_class="x"), str(out))
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_run_that_wrote_nothing_does_not_block_the_corrected_rerun(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3, "b": 3})
    fx.write(os.path.join(src, "a", "broken.jpg"), b"not a jpeg")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["prepare", "--format", "imagefolder", "--source", src, "--super-class", "x", "--out", str(out), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "1 bad file(s)" in res.output
    assert sorted(os.listdir(out)) == ["_run.json"]  # the claim, and nothing else
    res = runner.invoke(app, args + ["--on-bad-image", "skip"])  # a different config, same --out
    assert res.exit_code == 0, res.output
    assert canonical.open_dataset(str(out)).info.skipped["bad_files"] == 1


def test_interrupted_attempt_does_not_block_another_config(tmp_path):
    """Shards of an attempt that died before dataset.json are never resumed (every attempt rewrites
    images/), so they do not make the output anyone's; a complete dataset still does."""
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4})
    out = tmp_path / "out"
    prepare(PrepareConfig("imagefolder", str(src), super_class="x"), str(out))
    (out / "dataset.json").unlink()  # as if killed before the commit point
    info = prepare(PrepareConfig("imagefolder", str(src), super_class="x", val_fraction=0.5), str(out))
    assert info.class_counts("val") == [2, 2]
    with pytest.raises(DiffmixError, match="different config.*--overwrite"):
        prepare(PrepareConfig("imagefolder", str(src), super_class="x"), str(out))


@pytest.mark.parametrize("entries, taken", [
    ([], True),  # a bare claim: nothing to lose
    (["images/train-00000.parquet"], True),  # only what the claiming stage declared disposable
    (["shards/shard-00000.parquet"], False),  # partial work the stage would resume: still owned
    (["dataset.json"], False),  # a finished result
])
def test_claim_output_takes_over_a_claim_that_holds_no_result(tmp_path, entries, taken):
    out = tmp_path / "out"
    storage.claim_output(str(out), "prepare", {"seed": 0}, inputs={})
    for rel in entries:
        fx.write(str(out / rel), b"x")
    if taken:
        assert storage.claim_output(str(out), "prepare", {"seed": 1}, disposable=("images",), inputs={}) is False
        assert sorted(os.listdir(out)) == ["_lease.json", "_run.json"]  # this process still holds the lease
        assert json.loads((out / "_run.json").read_text())["config"] == {"seed": 1}
    else:
        with pytest.raises(DiffmixError, match="different config"):
            storage.claim_output(str(out), "prepare", {"seed": 1}, disposable=("images",), inputs={})
        assert (out / entries[0]).exists()


def test_claim_output_disposable_entries_belong_to_the_claiming_stage(tmp_path):
    out = tmp_path / "out"
    storage.claim_output(str(out), "generate", {"seed": 0}, inputs={})
    assert storage.claim_output(str(out), "prepare", {"seed": 0}, inputs={}) is False  # a bare claim of another stage
    storage.claim_output(str(out), "generate", {"seed": 0}, overwrite=True, inputs={})
    fx.write(str(out / "images" / "x.parquet"), b"x")  # not generate's to dispose of
    with pytest.raises(DiffmixError, match="holds the output of `generate`"):
        storage.claim_output(str(out), "prepare", {"seed": 0}, disposable=("images",), inputs={})


def test_interrupted_output_is_not_a_dataset(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3, "b": 3})
    out = tmp_path / "out"
    prepare(PrepareConfig("imagefolder", str(src), super_class="x"), str(out))
    (out / "dataset.json").unlink()  # as if killed before the commit point
    with pytest.raises(DiffmixError, match="not a canonical dataset"):
        canonical.open_dataset(str(out))
    prepare(PrepareConfig("imagefolder", str(src), super_class="x"), str(out))  # rerun completes it
    assert canonical.open_dataset(str(out)).info.split_size("train") == 4


def test_cli_prepare_and_derive(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 6, "b": 6})
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--format", "imagefolder", "--source", src, "--super-class", "x",
                              "--out", str(tmp_path / "ds"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prepare", "--from", str(tmp_path / "ds"), "--shots", "1", "--out", str(tmp_path / "k1")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "k1" / "dataset.json").read_text())
    assert info["counts"]["train"] == {"0": 1, "1": 1}


def test_cli_config_file_and_flag_precedence(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 10, "b": 10})
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"format: imagefolder\nsource: {src}\nsuper-class: widget\nval_fraction: 0.5\n")
    res = CliRunner().invoke(app, ["prepare", "--config", str(cfg), "--val-fraction", "0.2",
                                   "--out", str(tmp_path / "ds"), "--quiet"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["super_class"] == "widget" and info["counts"]["val"] == {"0": 2, "1": 2}


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    res = CliRunner().invoke(app, ["prepare", "--format", "tarball", "--source", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "--format 'tarball' is not supported" in res.output and "Traceback" not in res.output
