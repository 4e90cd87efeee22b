"""train-cls --synthetic-filter without Ray: the syntax and its refusals, the bands as the reference's
filter_syn_data.py draws them, per-class bands, and the read side of the scores (missing, incomplete,
computed for other shards, without the column) on hand-written scores beside hand-written shards.
The filter on Ray Train, end to end on real scores, is in test_score.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from diffmix_ray import canonical
from diffmix_ray.classify import filters
from diffmix_ray.classify.config import ClassifyConfig
from diffmix_ray.classify.run import run_classify
from diffmix_ray.cli import app
from diffmix_ray.contracts import SCORE_COLUMNS
from diffmix_ray.errors import DiffmixError
from diffmix_ray.scores import is_scores_output, open_scores
from diffmix_ray.synthetic import open_synthetic

from tests import fixtures as fx


# ---------------------------------------------------------------------------------------------
# The conditions, as functions
# ---------------------------------------------------------------------------------------------
def test_conditions_parse_to_one_canonical_form():
    assert [c.spec for c in filters.parse(["clip_target_prob >= 0.20", "clip_object_prob:p10-100,"
                                           "clip_target_prob:p50-100@class"])] == \
        ["clip_target_prob>=0.2", "clip_object_prob:p10-100", "clip_target_prob:p50-100@class"]
    assert filters.split_specs("a>=1, b:p1-2") == ("a>=1", "b:p1-2")  # the config's one form
    assert ClassifyConfig("d", "a", "o", synthetic=("s",), synthetic_filter="clip_target_prob>=0.2, "
                          "clip_object_prob:p10-100").synthetic_filter == ClassifyConfig(
        "d", "a", "o", synthetic=("s",), synthetic_filter=["clip_target_prob>=0.2", "clip_object_prob:p10-100"]
    ).synthetic_filter


@pytest.mark.parametrize("spec, message", [
    ("clip_target_prop>=0.2", r"unknown score column 'clip_target_prop'; the score columns are clip_target_prob, "
                              r"clip_source_prob, .*classifier_source_prob"),
    ("clip_object_prob:p90-10", r"impossible percentile band p90-10: pA-B needs 0 <= A < B <= 100"),
    ("clip_object_prob:p0-101", r"impossible percentile band p0-101"),
    ("clip_object_prob:p10-10", r"impossible percentile band p10-10"),
    ("clip_object_prob:pten-100", r"percentile 'ten' is not a number"),
    ("clip_object_prob:p10-100@source", r"unknown scope @source; the only one is @class"),
    ("clip_target_prob>=0.2@class", r"a threshold is the same in every class"),
    ("clip_target_prob=0.2", r"'clip_target_prob=0.2' is not a condition: write COLUMN>=VALUE"),
    ("clip_target_prob>=nan", r"threshold 'nan' is not a number"),
])
def test_bad_conditions_say_what_is_wrong(spec, message):
    with pytest.raises(DiffmixError, match=message):
        filters.parse(spec)


def test_bands_split_a_run_as_the_reference_does():
    """p0-10 and p10-100 partition the images at numpy's 10th percentile (filter_syn_data.py keeps
    score >= percentile(10) in meta_10-100per, the rest in meta_0-10per); p90-100 is score >= percentile(90)."""
    rng = np.random.default_rng(0)
    v = rng.random(1000)
    t = np.zeros(1000, dtype=int)
    low, _ = filters.parse_one("clip_object_prob:p0-10").passes(v, t)
    high, cut = filters.parse_one("clip_object_prob:p10-100").passes(v, t)
    top, _ = filters.parse_one("clip_object_prob:p90-100").passes(v, t)
    assert np.array_equal(high, v >= np.percentile(v, 10)) and np.array_equal(low, ~high)
    assert np.array_equal(top, v >= np.percentile(v, 90)) and top.sum() == 100
    assert cut == {"all": [pytest.approx(np.percentile(v, 10)), pytest.approx(v.max())]}


def test_per_class_bands_and_missing_values():
    v = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 10.0, 20.0, 30.0, 40.0, 50.0])
    t = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    ok, cut = filters.parse_one("clip_target_prob:p50-100@class").passes(v, t)
    # each class keeps its own upper half; a row without a value passes nothing and counts in no percentile
    assert np.flatnonzero(ok).tolist() == [2, 3, 7, 8, 9]
    assert cut == {"0": [pytest.approx(0.25), pytest.approx(0.4)], "1": [30.0, 50.0]}
    ok, _ = filters.parse_one("clip_target_prob:p50-100").passes(v, t)  # globally: class 0 loses all
    assert np.flatnonzero(ok).tolist() == [5, 6, 7, 8, 9]
    ok, each = filters.keep(filters.parse("clip_target_prob>0.3, clip_target_prob<45"), {"clip_target_prob": v}, t)
    assert np.flatnonzero(ok).tolist() == [3, 5, 6, 7, 8] and [e["passed"] for e in each] == [6, 8]


# ---------------------------------------------------------------------------------------------
# Reading scores beside shards
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("filters")
    raw = fx.make_imagefolder(str(root / "raw"), {"a": 8, "b": 8, "c": 8})
    prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0.25), str(root / "ds"),
            show_progress=False)
    return str(root / "ds")


def cfg(shapes, out, **kw):
    return ClassifyConfig(**(dict(dataset=shapes, arch="test_resnet", out=str(out), img_size=32, epochs=1,
                                  batch_size=4) | kw))


def _syn(shapes, path, seed=0):
    syn = fx.fake_synthetic(str(path), shapes, 0.5, seed=seed)
    return syn, open_synthetic(syn, canonical.open_dataset(shapes).info.fingerprint)


def test_select_keeps_by_each_runs_own_scores_and_records_it(shapes, tmp_path):
    a, set_a = _syn(shapes, tmp_path / "a")
    b, set_b = _syn(shapes, tmp_path / "b", seed=1)
    n = len(set_a.read(["pair_id"]))
    fx.fake_scores(a, {"clip_object_prob": np.linspace(0, 1, n)})
    fx.fake_scores(b, {"clip_object_prob": np.linspace(1, 0, n)}, name="other")
    src = np.concatenate([set_a.read(["source_label"]).column(0).to_numpy()] * 2)
    tgt = np.concatenate([set_a.read(["target_label"]).column(0).to_numpy(),
                          set_b.read(["target_label"]).column(0).to_numpy()])
    sel = filters.select(filters.parse("clip_object_prob:p50-100"), [set_a, set_b], ["default", "other"], src, tgt,
                         allow_incomplete=False)
    half = n - n // 2  # p50-100 of n distinct values
    # each run keeps its own upper half: the end of run a, the start of run b (percentiles per run)
    assert sel.rows.tolist() == list(range(n - half, n)) + list(range(n, n + half))
    r = sel.record
    assert (r["kept"], r["total"], r["conditions"]) == (2 * half, 2 * n, ["clip_object_prob:p50-100"])
    assert [s["name"] for s in r["scores"]] == ["default", "other"] and all(s["complete"] for s in r["scores"])
    assert sum(p["kept"] for p in r["pairs"]) == 2 * half and sum(p["total"] for p in r["pairs"]) == 2 * n
    assert {(p["source"], p["target"]) for p in r["pairs"]} == set(zip(src.tolist(), tgt.tolist()))
    assert json.dumps(r)  # what metrics.json holds
    assert filters.describe(r) == ("synthetic filter clip_object_prob:p50-100 (scores default, other): kept 18 of 36 "
                                   "synthetic images (50.0%)")


def test_scores_that_cannot_be_used_are_refused_with_the_fix(shapes, tmp_path, warnings_seen):
    syn, s = _syn(shapes, tmp_path / "syn")
    with pytest.raises(DiffmixError, match=r"reads the scores .*scores/default, which do not exist; it has no scores "
                                           r"yet. Score the shards first: `diffmix-ray score --synthetic .*syn --clip"):
        open_scores(s)
    fx.fake_scores(syn, name="clip-b32")
    with pytest.raises(DiffmixError, match=r"it has scores clip-b32 \(pick one with --scores NAME\)"):
        open_scores(s)
    assert open_scores(s, "clip-b32").complete
    fx.fake_scores(syn, name="stale", fingerprint="0" * 16)
    with pytest.raises(DiffmixError, match=r"scores .*stale were computed for other shards \(fingerprint 000000000000; "
                                           r"the shards in .* now have .*--name stale --overwrite"):
        open_scores(s, "stale")
    fx.fake_scores(syn, name="partial", complete=False, drop=3)
    with pytest.raises(DiffmixError, match=r"scores .*partial are incomplete \(no _SUCCESS\): 15 of 18 pairs scored.*"
                                           r"--allow-incomplete \(pairs without a score are never kept\)"):
        open_scores(s, "partial")
    assert not open_scores(s, "partial", allow_incomplete=True).complete
    assert any("using incomplete scores" in w for w in warnings_seen)
    # complete scores written while the shards were still growing: pairs without a score
    fx.fake_scores(syn, name="short", drop=2)
    labels = np.zeros(18, dtype=int)
    with pytest.raises(DiffmixError, match=r"have no score for 2 of the 18 pairs .*rerun the same `diffmix-ray score`"):
        filters.select(filters.parse("clip_object_prob>=0"), [s], ["short"], labels, labels, False)
    kept = filters.select(filters.parse("clip_object_prob>=0"), [s], ["short"], labels, labels, True)
    assert kept.record["kept"] == 16 and kept.record["scores"][0]["without_score"] == 2
    with pytest.raises(DiffmixError, match=r"classifier_target_prob>=0.5': the scores .* hold no value in "
                                           r"classifier_target_prob \(they were computed without --classifier"):
        filters.select(filters.parse("classifier_target_prob>=0.5"), [s], ["clip-b32"], labels, labels, False)
    with pytest.raises(DiffmixError, match=r"clip_object_prob>0.9 keeps none of the 18 synthetic images: loosen it"):
        filters.select(filters.parse("clip_object_prob>0.9"), [s], ["clip-b32"], labels, labels, False)
    assert is_scores_output(os.path.join(syn, "scores", "clip-b32")) and not is_scores_output(syn)


def test_train_cls_refuses_a_filter_before_claiming_its_output(shapes, tmp_path):
    syn, _ = _syn(shapes, tmp_path / "syn")
    out = tmp_path / "o"
    with pytest.raises(DiffmixError, match=r"which do not exist; it has no scores yet. Score the shards first"):
        run_classify(cfg(shapes, out, synthetic=(syn,), synthetic_filter=("clip_object_prob:p10-100",)))
    assert not out.exists()
    for kw, message in [
        (dict(synthetic_filter=("clip_object_prob:p10-100",)), "--synthetic-filter chooses among synthetic images: "
                                                               "pass --synthetic"),
        (dict(synthetic=(syn,), scores=("x",)), "--scores x names the scores a --synthetic-filter reads: give a filter"),
        (dict(synthetic=(syn,), synthetic_filter=("clip_object_prob>0",), scores=("a", "b", "c")),
         "--scores: 3 names for 1 --synthetic runs"),
        (dict(synthetic=(syn,), synthetic_filter=("clip_object_prob>0",), scores=("../x",)),
         "--scores '../x' must be the --name of a `score` run"),
    ]:
        with pytest.raises(DiffmixError, match=message):
            run_classify(cfg(shapes, out, **kw))
    assert not out.exists()
    result = CliRunner().invoke(app, ["train-cls", "--dataset", shapes, "--arch", "test_resnet", "--out", str(out),
                                      "--synthetic", syn, "--synthetic-filter", "clip_object_score>=0.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown score column 'clip_object_score'" in " ".join(result.output.split())
    assert all(c in " ".join(result.output.split()).replace(" ", "") for c in SCORE_COLUMNS)  # the known ones listed
