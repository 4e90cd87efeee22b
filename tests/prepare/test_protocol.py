"""The dataset protocol `prepare` offers for reproducing the paper: the Flowers-102 reference split,
no val split (--val-fraction 0), the reference long-tail construction beside the geometric one, and
the many/medium/few thresholds recorded in dataset.json."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from diffmix_ray import canonical
from diffmix_ray.cli import app
from diffmix_ray.data import splits
from diffmix_ray.data.prepare import DeriveConfig, PrepareConfig, derive, prepare
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _ids(root, split):
    return set(canonical.open_dataset(root).read_split(split, columns=["image_id"]).column("image_id").to_pylist())


# ---------------------------------------------------------------------------------------------
# Flowers-102 --split reference
# ---------------------------------------------------------------------------------------------
SIZES = [4 + c % 5 for c in range(102)]  # 4..8 images per class: odd and even halves


def _reference_train(src: str, seed: int) -> set[str]:
    """The Diff-Mix code's split, written out independently as the oracle: sorted jpg/ files against
    imagelabels.mat, one default_rng(seed) over classes in label order, first int(0.5 n) are train."""
    labels = scipy.io.loadmat(os.path.join(src, "imagelabels.mat"))["labels"][0]
    files = sorted(os.listdir(os.path.join(src, "jpg")))
    class_to_images = defaultdict(list)
    for idx, name in enumerate(files):
        class_to_images[labels[idx] - 1].append(name.removesuffix(".jpg"))
    rng = np.random.default_rng(seed)
    train = set()
    for c in range(102):
        perm = rng.permutation(len(class_to_images[c]))
        first = np.array_split(perm, [int(0.5 * len(perm))])[0]
        train |= {class_to_images[c][i] for i in first}
    return train


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return fx.make_flowers102(str(tmp_path_factory.mktemp("flowers")), per_class=SIZES, interleave=True)


def test_flowers_reference_split_is_the_reference_halves(flowers, tmp_path):
    out = str(tmp_path / "ref")
    info = prepare(PrepareConfig("flowers102", flowers, split="reference", val_fraction=0.0), out, show_progress=False)
    assert info.class_counts("train") == [n // 2 for n in SIZES]
    assert info.class_counts("test") == [n - n // 2 for n in SIZES]
    assert info.splits == ["train", "test"] and info.split_size("train") + info.split_size("test") == sum(SIZES)
    assert _ids(out, "train") == _reference_train(flowers, 0)
    assert _ids(out, "test").isdisjoint(_ids(out, "train"))
    assert info.source["split"] == "reference" and info.source["carved"] == {}
    # another seed: another split, still the reference's procedure
    other = prepare(PrepareConfig("flowers102", flowers, split="reference", val_fraction=0.0, seed=1),
                    str(tmp_path / "ref1"), show_progress=False)
    assert other.class_counts("train") == info.class_counts("train")
    assert _ids(str(tmp_path / "ref1"), "train") == _reference_train(flowers, 1) != _ids(out, "train")


def test_flowers_reference_split_carves_val_from_its_train_half_only(flowers, tmp_path):
    out = str(tmp_path / "ref")
    info = prepare(PrepareConfig("flowers102", flowers, split="reference"), out, show_progress=False)
    assert _ids(out, "train") | _ids(out, "val") == _reference_train(flowers, 0)
    assert info.source["carved"] == {"val": 0.1} and info.split_size("val") == 102  # >= 1 per class


def test_flowers_reference_split_needs_no_setid(tmp_path):
    src = fx.make_flowers102(str(tmp_path / "flowers"), per_class=2)
    os.remove(os.path.join(src, "setid.mat"))
    info = prepare(PrepareConfig("flowers102", src, split="reference", val_fraction=0.0), str(tmp_path / "o"),
                   show_progress=False)
    assert info.class_counts("train") == [1] * 102
    with pytest.raises(DiffmixError, match="setid.mat is missing"):
        prepare(PrepareConfig("flowers102", src), str(tmp_path / "official"), show_progress=False)


@pytest.mark.parametrize("fmt", ["cub", "imagefolder", "parquet"])
def test_split_reference_is_refused_where_the_format_has_none(tmp_path, fmt):
    with pytest.raises(DiffmixError, match=f"--split reference .*--format {fmt} has no such split"):
        prepare(PrepareConfig(fmt, str(tmp_path), super_class="x", split="reference"), str(tmp_path / "o"))
    with pytest.raises(DiffmixError, match="--split 'halves': choose official or reference"):
        prepare(PrepareConfig("flowers102", str(tmp_path), split="halves"), str(tmp_path / "o"))


# ---------------------------------------------------------------------------------------------
# --val-fraction 0: no val split, and nothing downstream trips over its absence
# ---------------------------------------------------------------------------------------------
def test_val_fraction_zero_leaves_val_out_entirely(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 5, "b": 7, "c": 6})
    out = str(tmp_path / "full")
    info = prepare(PrepareConfig("imagefolder", src, super_class="x", val_fraction=0.0), out, show_progress=False)
    written = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert list(written["counts"]) == ["train"] and list(written["files"]) == ["train"]  # no empty val entry
    assert written["source"]["carved"] == {}
    assert os.listdir(os.path.join(out, "images")) == ["train-00000.parquet"]
    assert info.splits == ["train"] and not info.has_split("val") and info.class_counts("train") == [5, 7, 6]
    ds = canonical.open_dataset(out)
    assert ds.files("val") == [] and ds.info.class_counts("val") == [0, 0, 0] and ds.info.split_size("val") == 0
    empty = ds.read_split("val")
    assert empty.num_rows == 0 and empty.schema.names == ["image_id", "image", "label", "split"]
    for cfg, name in ((DeriveConfig(out, shots=2), "k2"), (DeriveConfig(out, imbalance_ratio=5.0), "lt")):
        child = derive(cfg, str(tmp_path / name))
        assert child.splits == ["train"]
        assert list(json.loads(open(tmp_path / name / "dataset.json").read())["counts"]) == ["train"]


def test_cli_val_fraction_zero_says_there_is_no_val(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4})
    res = CliRunner().invoke(app, ["prepare", "--format", "imagefolder", "--source", src, "--super-class", "x",
                                   "--val-fraction", "0", "--out", str(tmp_path / "ds"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "no val or test split" in _flat(res.output)
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["counts"] == {"train": {"0": 4, "1": 4}}


# ---------------------------------------------------------------------------------------------
# Long-tail constructions
# ---------------------------------------------------------------------------------------------
# CUB-200-2011's official train split: 5,994 images in 200 classes, 29 or 30 per class. The reference
# targets depend only on avg = N / C and the size ranking, so any 30/29 mix with these totals gives
# the paper's counts; here classes 10, 50, 90, 130, 170 and 190 are the 29-image ones.
CUB_SHORT = (10, 50, 90, 130, 170, 190)
CUB_TRAIN = [29 if c in CUB_SHORT else 30 for c in range(200)]
CUB_LT100_HISTOGRAM = {29: 2, 28: 1, 27: 2, 26: 2, 25: 1, 24: 2, 23: 2, 22: 2, 21: 2, 20: 2, 19: 2, 18: 2,
                       17: 3, 16: 2, 15: 3, 14: 3, 13: 3, 12: 4, 11: 4, 10: 4, 9: 4, 8: 5, 7: 6, 6: 7, 5: 7,
                       4: 10, 3: 12, 2: 18, 1: 83}


def _cub_rows():
    return [(f"c{c:03d}-{i:02d}", c) for c in range(200) for i in range(CUB_TRAIN[c])]


def test_reference_long_tail_gives_cub_lt100_exactly():
    assert sum(CUB_TRAIN) == 5994
    targets = splits.reference_long_tail_targets(CUB_TRAIN, 100.0)
    assert Counter(targets) == CUB_LT100_HISTOGRAM
    assert sum(targets) == 1242
    groups = Counter("many" if n > 20 else "few" if n < 5 else "medium" for n in targets)
    assert groups == {"many": 16, "medium": 61, "few": 123}
    # ranked by size, ties in label order: 30-image classes first, the 29-image ones last (1 each)
    assert targets[:3] == [29, 29, 28] and [targets[c] for c in CUB_SHORT] == [1] * 6
    chosen, kept, short = splits.long_tail(_cub_rows(), 200, 100.0, seed=0, construction="reference")
    assert len(chosen) == 1242 and kept == targets and short == {}
    assert Counter(int(i[1:4]) for i in chosen) == {c: n for c, n in enumerate(targets)}


def test_geometric_long_tail_after_a_val_carve_is_todays_cub_lt100():
    rows = _cub_rows()
    carved = splits.carve(rows, {"val": 0.1}, seed=0)
    train = [r for r in rows if r[0] not in carved]
    assert len(train) == 5394
    chosen, targets, short = splits.long_tail(train, 200, 100.0, seed=0, construction="geometric")
    assert len(chosen) == sum(targets) == 1124 and short == {}
    assert sum(n > 20 for n in targets) == 11 and max(targets) == 27 and min(targets) == 1
    # the reference construction on the same carved split: below the paper's 1,242
    assert len(splits.long_tail(train, 200, 100.0, seed=0, construction="reference")[0]) == 1120


def test_reference_long_tail_end_to_end_counts(tmp_path):
    # avg = 61 / 6; rank by size (ties by label): b, d, a, f, e, c; n_i = max(1, int(avg * 0.1^(i/4)))
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 10, "b": 12, "c": 8, "d": 12, "e": 9, "f": 10})
    parent = str(tmp_path / "parent")
    prepare(PrepareConfig("imagefolder", src, super_class="x", val_fraction=0.0), parent, show_progress=False)
    info = derive(DeriveConfig(parent, imbalance_ratio=10.0, seed=4), str(tmp_path / "lt"))
    assert info.class_counts("train") == [3, 10, 1, 5, 1, 1]
    assert info.subset["construction"] == "reference" and info.subset["targets"] == [3, 10, 1, 5, 1, 1]
    assert info.subset["short_classes"] == {} and info.config["long_tail"] == "reference"
    geometric = derive(DeriveConfig(parent, imbalance_ratio=10.0, seed=4, long_tail="geometric"),
                       str(tmp_path / "geo"))
    assert geometric.subset["construction"] == "geometric"
    targets = geometric.subset["targets"]
    assert sorted(targets, reverse=True) == [12, 7, 4, 3, 1, 1]  # floor(12 * 10^(-i/5)) in a seeded class order
    sizes = [10, 12, 8, 12, 9, 10]
    assert geometric.class_counts("train") == [min(t, n) for t, n in zip(targets, sizes)]


def test_reference_target_above_a_class_size_keeps_all_and_says_so():
    # avg = 39 / 4; rank 1 (class a, 3 images) gets int(9.75 * 0.5^(1/2)) = 6: the reference would crash
    rows = [(f"{c}{i}", label) for label, (c, n) in enumerate((("a", 3), ("b", 3), ("c", 3), ("d", 30)))
            for i in range(n)]
    chosen, targets, short = splits.long_tail(rows, 4, 2.0, seed=0, construction="reference")
    assert targets == [6, 4, 3, 9] and short == {0: 3, 1: 1}
    assert len(chosen) == 3 + 3 + 3 + 9


def test_reference_long_tail_warns_when_the_parent_lost_train_images_to_val(tmp_path, warnings_seen):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {f"c{i}": 10 for i in range(4)})
    parent = str(tmp_path / "parent")
    prepare(PrepareConfig("imagefolder", src, super_class="x"), parent, show_progress=False)
    lt = str(tmp_path / "lt")
    derive(DeriveConfig(parent, imbalance_ratio=4.0), lt)
    assert any("--val-fraction 0" in w and "moved 0.1 of its train split to val" in w for w in warnings_seen)
    derive(DeriveConfig(lt, imbalance_ratio=2.0), str(tmp_path / "lt2"))
    assert any("already long-tailed" in w for w in warnings_seen)


@pytest.mark.parametrize("kwargs, message", [
    ({"shots": 2, "long_tail": "reference"}, "--long-tail reference chooses how --imbalance-ratio builds"),
    ({"imbalance_ratio": 1.0}, "--imbalance-ratio 1 keeps every class the same size"),
    ({"imbalance_ratio": 0.5}, r"--imbalance-ratio 0.5 must be > 1"),
    ({"imbalance_ratio": 10.0, "long_tail": "exponential"}, "--long-tail 'exponential': choose reference"),
])
def test_long_tail_option_misuse(tmp_path, kwargs, message):
    with pytest.raises(DiffmixError, match=message):
        derive(DeriveConfig(str(tmp_path), **kwargs), str(tmp_path / "o"))


def test_reference_long_tail_needs_three_classes(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 6, "b": 6})
    parent = str(tmp_path / "parent")
    prepare(PrepareConfig("imagefolder", src, super_class="x", val_fraction=0.0), parent, show_progress=False)
    with pytest.raises(DiffmixError, match="at least 3 classes .* use --long-tail geometric"):
        derive(DeriveConfig(parent, imbalance_ratio=3.0), str(tmp_path / "lt"))
    assert derive(DeriveConfig(parent, imbalance_ratio=3.0, long_tail="geometric"),
                  str(tmp_path / "lt")).split_size("train") == 6 + 2


def test_cli_long_tail_options_in_the_wrong_place(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4, "c": 4})
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--format", "imagefolder", "--source", src, "--super-class", "x",
                              "--long-tail", "reference", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "then pass --from URI" in _flat(res.output)
    res = runner.invoke(app, ["prepare", "--format", "imagefolder", "--source", src, "--super-class", "x",
                              "--out", str(tmp_path / "ds"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prepare", "--from", str(tmp_path / "ds"), "--imbalance-ratio", "4",
                              "--val-fraction", "0", "--split", "reference", "--out", str(tmp_path / "lt")])
    assert res.exit_code == 2 and "--split, --val-fraction only apply when reading a raw source" in _flat(res.output)
    res = runner.invoke(app, ["prepare", "--from", str(tmp_path / "ds"), "--imbalance-ratio", "4",
                              "--long-tail", "geometric", "--out", str(tmp_path / "lt")])
    assert res.exit_code == 0, res.output
    assert "long tail: geometric construction, imbalance ratio 4" in _flat(res.output)


# ---------------------------------------------------------------------------------------------
# --shot-thresholds
# ---------------------------------------------------------------------------------------------
def test_shot_thresholds_default_per_dataset_and_are_inherited(tmp_path):
    cub = prepare(PrepareConfig("cub", fx.make_cub(str(tmp_path / "CUB")), val_fraction=0.0), str(tmp_path / "cub"))
    assert cub.shot_thresholds == {"many": 20, "few": 5}
    flowers = prepare(PrepareConfig("flowers102", fx.make_flowers102(str(tmp_path / "fl"))),
                      str(tmp_path / "flowers"), show_progress=False)
    assert flowers.shot_thresholds == {"many": 30, "few": 10}
    assert json.loads((tmp_path / "flowers" / "dataset.json").read_text())["shot_thresholds"] == {"few": 10, "many": 30}
    folder = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4, "c": 4})
    other = prepare(PrepareConfig("imagefolder", folder, super_class="x", shot_thresholds="8,2"), str(tmp_path / "if"))
    assert other.shot_thresholds == {"many": 8, "few": 2}
    lt = derive(DeriveConfig(str(tmp_path / "flowers"), imbalance_ratio=2.0), str(tmp_path / "flowers-lt"))
    assert lt.shot_thresholds == {"many": 30, "few": 10}  # the parent's
    mine = derive(DeriveConfig(str(tmp_path / "flowers"), imbalance_ratio=2.0, shot_thresholds=(25, 3)),
                  str(tmp_path / "flowers-lt-25-3"))
    assert mine.shot_thresholds == {"many": 25, "few": 3}


def test_spelling_out_the_default_thresholds_is_the_same_config(tmp_path):
    src = fx.make_cub(str(tmp_path / "CUB"))
    out = str(tmp_path / "cub")
    first = prepare(PrepareConfig("cub", src), out)
    assert prepare(PrepareConfig("cub", src, shot_thresholds="20,5"), out).fingerprint == first.fingerprint


@pytest.mark.parametrize("value, message", [
    ("5,20", r"5,20 is out of order: give MANY first, .* e\.g\. 20,5"),
    ("10,10", "10,10 is out of order"),
    ("20,-1", "FEW must be >= 0"),
    ("20", "must be two whole numbers MANY,FEW"),
    ("twenty,five", "must be two whole numbers"),
    ((20.5, 5), "must be two whole numbers"),
])
def test_shot_thresholds_out_of_order_or_malformed(tmp_path, value, message):
    with pytest.raises(DiffmixError, match=message):
        PrepareConfig("cub", str(tmp_path), shot_thresholds=value)
    with pytest.raises(DiffmixError, match=message):
        DeriveConfig(str(tmp_path), imbalance_ratio=10.0, shot_thresholds=value)


def test_cli_shot_thresholds_out_of_order(tmp_path):
    res = CliRunner().invoke(app, ["prepare", "--format", "cub", "--source", str(tmp_path), "--shot-thresholds", "5,20",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "out of order" in _flat(res.output) and "Traceback" not in res.output


def test_shot_thresholds_on_a_balanced_dataset_warn(tmp_path, warnings_seen):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 6, "b": 6, "c": 6})
    prepare(PrepareConfig("imagefolder", src, super_class="x", shot_thresholds="20,5"), str(tmp_path / "o"))
    assert any("put all 3 classes in 'medium'" in w and "long-tailed" in w for w in warnings_seen)
    warnings_seen.clear()
    prepare(PrepareConfig("imagefolder", src, super_class="x"), str(tmp_path / "default"))
    assert not warnings_seen  # defaults are recorded silently


def test_a_dataset_json_without_thresholds_reads_as_cubs(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"a": 3, "b": 3})
    info = prepare(PrepareConfig("imagefolder", src, super_class="x", shot_thresholds="9,4"), str(tmp_path / "o"))
    assert info.many_few() == (9, 4)
    meta = tmp_path / "o" / "dataset.json"
    old = json.loads(meta.read_text())
    del old["shot_thresholds"]  # as written before the field existed
    meta.write_text(json.dumps(old))
    assert canonical.open_dataset(str(tmp_path / "o")).info.many_few() == (20, 5)
