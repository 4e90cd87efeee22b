"""`score` end to end on Ray, on real shards from `generate` (tiny model, 16 pairs): a complete
output beside untouched shards, a classifier's confidence, reruns, refusals, undecodable images,
and a kill during scoring followed by a rerun that ends with exactly one score per pair.

Small on purpose: each scoring actor takes seconds to start, so one generate run and one scored
copy are shared (copied) by the tests that change them."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffmix_ray import canonical, storage
from diffmix_ray.contracts import (DATASET_JSON, MANIFEST_JSON, RUN_JSON, SCORE_COLUMNS, SCORES_SCHEMA, SHARDS_DIR,
                                   SUCCESS)
from diffmix_ray.errors import DiffmixError
from diffmix_ray.exactly_once import IncompleteOutput
from diffmix_ray.generate.run import run_generate
from diffmix_ray.score.config import ScoreConfig
from diffmix_ray.score.run import run_score

from tests.waiting import wait_for
from tests.generate.test_ray import cli_process, config, read_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PAIRS = 16
FAST = dict(clip="tiny", batch_size=4, rows_per_file=8)


def scores_dir(synthetic: str, name: str = "default") -> str:
    return os.path.join(synthetic, "scores", name)


def score_files(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.endswith(".parquet")) if os.path.isdir(out) else []


def read_scores(out: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(os.path.join(out, n)) for n in score_files(out)])


def readable_score_files(out: str) -> list[str]:
    """Score files that are complete (a file being written has no footer yet)."""
    readable = []
    for name in score_files(out):
        try:
            pq.read_metadata(os.path.join(out, name))
            readable.append(name)
        except Exception:  # noqa: BLE001 - any failure to read the footer means "not complete"
            pass
    return readable


def assert_one_score_per_pair(synthetic: str, name: str = "default") -> pa.Table:
    table = read_scores(scores_dir(synthetic, name))
    ids = table.column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)), "a pair has two scores"
    assert set(ids) == set(read_shards(synthetic).column("pair_id").to_pylist())
    return table


def tree_state(folder: str) -> dict[str, tuple[int, float]]:
    return {n: (os.path.getsize(os.path.join(folder, n)), os.path.getmtime(os.path.join(folder, n)))
            for n in sorted(os.listdir(folder))}


def copy_of(run: str, tmp_path, name: str = "syn") -> str:
    out = str(tmp_path / name)
    shutil.copytree(run, out)
    return out


@pytest.fixture(scope="module")
def generated(ray_local, sample_dataset, tmp_path_factory) -> str:
    """One finished real-mix run: 16 pairs in 2 shards."""
    out = str(tmp_path_factory.mktemp("gen") / "syn")
    run_generate(config(sample_dataset, out, limit=PAIRS))
    return out


def make_classifier_run(out: str, dataset_fingerprint: str, num_classes: int = 4, finished: bool = True) -> str:
    """A train-cls output as train-cls writes it (its own save_best), with random weights."""
    import timm

    from diffmix_ray.classify.loop import save_best
    from diffmix_ray.classify.transforms import data_config

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    save_best(out, model.state_dict(), {"arch": "test_resnet", "num_classes": num_classes, "epoch": 0, "val_top1": 0.5,
                                        "select": "val", "data_cfg": data_config("test_resnet", "timm", 40, None),
                                        "dataset_fingerprint": dataset_fingerprint})
    if finished:
        storage.write_text_atomic(os.path.join(out, SUCCESS), "")
    return out


@pytest.fixture(scope="module")
def classifier_run(sample_dataset, tmp_path_factory) -> str:
    info = canonical.open_dataset(sample_dataset).info
    return make_classifier_run(str(tmp_path_factory.mktemp("cls") / "run"), info.fingerprint)


@pytest.fixture(scope="module")
def scored(generated, classifier_run, tmp_path_factory) -> str:
    """A copy of the generate run, scored with the tiny CLIP and the classifier."""
    out = str(tmp_path_factory.mktemp("scored") / "syn")
    shutil.copytree(generated, out)
    run_score(ScoreConfig(synthetic=out, classifier=classifier_run, **FAST))
    return out


def test_scores_are_complete_beside_untouched_shards(scored, generated, classifier_run):
    out = scores_dir(scored)
    assert storage.exists(os.path.join(out, SUCCESS))
    table = assert_one_score_per_pair(scored)
    assert table.schema.remove_metadata().equals(SCORES_SCHEMA)
    assert tree_state(os.path.join(scored, SHARDS_DIR)).keys() == tree_state(os.path.join(generated, SHARDS_DIR)).keys()
    assert read_shards(scored).equals(read_shards(generated))  # the shards were only read
    m = storage.read_json(os.path.join(out, MANIFEST_JSON))
    assert m["counts"] | {"bytes": 0} == {"pairs": PAIRS, "scored": PAIRS, "missing": 0, "failed": 0, "bytes": 0,
                                          "files": len(score_files(out)), "duplicates_removed": 0,
                                          "unreadable_files_removed": 0}
    generate_run = storage.read_json(os.path.join(scored, RUN_JSON))
    assert m["synthetic_fingerprint"] == generate_run["config_hash"]  # the shards' own identity
    assert m["dataset_fingerprint"] == storage.read_json(os.path.join(scored, MANIFEST_JSON))["dataset_fingerprint"]
    assert m["classifier"]["run"] == classifier_run and m["timings"]["images_this_run"] == PAIRS
    for name in SCORE_COLUMNS:
        values = np.asarray(table.column(name).to_pylist(), dtype=np.float64)
        assert np.isfinite(values).all(), name  # real-mix: every pair has a source; a classifier was given
    for name in ("clip_target_prob", "clip_source_prob", "clip_object_prob", "classifier_target_prob"):
        assert ((table.column(name).to_numpy() >= 0) & (table.column(name).to_numpy() <= 1)).all()

    # The classifier's columns are its softmax through the pipeline `evaluate` uses.
    from diffmix_ray.classify.evaluate import load_best
    from diffmix_ray.classify.transforms import ToInput, pipeline

    model, meta = load_best(classifier_run)
    shards = {r["pair_id"]: r for r in read_shards(scored).to_pylist()}
    rows = table.to_pylist()
    pixels = [pipeline(meta["data_cfg"], False)(Image.open(io.BytesIO(shards[r["pair_id"]]["image"])).convert("RGB"))
              for r in rows]
    x = ToInput(meta["data_cfg"], "cpu")(torch.from_numpy(np.stack(pixels)))
    with torch.no_grad():
        probs = model(x).softmax(-1).numpy()
    for r, p in zip(rows, probs):
        assert r["classifier_target_prob"] == pytest.approx(p[r["target_label"]], abs=1e-5)
        assert r["classifier_source_prob"] == pytest.approx(p[r["source_label"]], abs=1e-5)
        assert (r["source_label"], r["target_label"]) == (shards[r["pair_id"]]["source_label"],
                                                          shards[r["pair_id"]]["target_label"])


def test_rerun_is_a_noop_and_another_config_is_refused(scored, classifier_run, capsys):
    out = scores_dir(scored)
    before = tree_state(out)
    run_score(ScoreConfig(synthetic=scored, classifier=classifier_run, **FAST | {"batch_size": 8}))
    assert "nothing to do" in capsys.readouterr().err and tree_state(out) == before
    with pytest.raises(DiffmixError, match="different config.*--overwrite"):
        run_score(ScoreConfig(synthetic=scored, **FAST | {"clip": "tiny:1"}))  # other weights, same name
    assert tree_state(out) == before


def test_bad_inputs_are_refused_before_any_work(generated, sample_dataset, tmp_path):
    info = canonical.open_dataset(sample_dataset).info
    other = make_classifier_run(str(tmp_path / "other"), "f" * 64)
    with pytest.raises(DiffmixError, match="trained on another dataset"):
        run_score(ScoreConfig(synthetic=generated, classifier=other, **FAST))
    unfinished = make_classifier_run(str(tmp_path / "unfinished"), info.fingerprint, finished=False)
    with pytest.raises(DiffmixError, match="unfinished train-cls run"):
        run_score(ScoreConfig(synthetic=generated, classifier=unfinished, **FAST))
    wrong = str(tmp_path / "dataset")
    shutil.copytree(sample_dataset, wrong)
    meta = storage.read_json(os.path.join(wrong, DATASET_JSON)) | {"fingerprint": "0" * 64}
    storage.write_json_atomic(os.path.join(wrong, DATASET_JSON), meta)
    with pytest.raises(DiffmixError, match="generated from another dataset"):
        run_score(ScoreConfig(synthetic=generated, dataset=wrong, **FAST))
    with pytest.raises(DiffmixError, match="not a `diffmix-ray generate` output"):
        run_score(ScoreConfig(synthetic=sample_dataset, **FAST))
    assert not os.path.exists(os.path.join(generated, "scores"))  # nothing was claimed or written


def test_cli_refuses_an_unknown_clip_spec(generated):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    result = CliRunner().invoke(app, ["score", "--synthetic", generated, "--clip", "vit-huge-please"])
    assert result.exit_code == 2 and "unknown --clip spec 'vit-huge-please'" in result.output
    result = CliRunner().invoke(app, ["score", "--synthetic", generated])
    assert result.exit_code == 2 and "--clip" in result.output


def test_incomplete_shards_with_an_undecodable_image(generated, tmp_path):
    """Shards without _SUCCESS are refused unless --allow-incomplete; an image that fails to decode
    is counted and listed, the other pairs are scored, and no _SUCCESS is written."""
    syn = copy_of(generated, tmp_path)
    os.remove(os.path.join(syn, SUCCESS))  # as a generate run that is still going leaves it
    with pytest.raises(DiffmixError, match="incomplete .*--allow-incomplete to score"):
        run_score(ScoreConfig(synthetic=syn, **FAST))
    assert not os.path.exists(os.path.join(syn, "scores"))
    shard = os.path.join(syn, SHARDS_DIR, sorted(os.listdir(os.path.join(syn, SHARDS_DIR)))[0])
    rows = pq.read_table(shard).to_pylist()
    bad = rows[1]["pair_id"]
    rows[1]["image"] = b"\xff\xd8\xff truncated, not a JPEG"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)

    with pytest.raises(IncompleteOutput, match=f"1 of {PAIRS} pairs have no score .*1 failed"):
        run_score(ScoreConfig(synthetic=syn, allow_incomplete=True, **FAST))

    out = scores_dir(syn)
    assert not os.path.exists(os.path.join(out, SUCCESS))
    m = storage.read_json(os.path.join(out, MANIFEST_JSON))
    assert (m["counts"]["scored"], m["counts"]["missing"], m["counts"]["failed"]) == (PAIRS - 1, 1, 1)
    assert m["synthetic_complete"] is False
    assert [f["pair_id"] for f in m["failed"]] == [bad] and "failed to decode" in m["failed"][0]["error"]
    shard_ids = set(read_shards(syn).column("pair_id").to_pylist())
    assert set(read_scores(out).column("pair_id").to_pylist()) == shard_ids - {bad}


def test_scores_of_shards_that_were_incomplete_are_rechecked_once_generate_finishes(scored, tmp_path):
    """Scores finished while generate was still going are not "done" for the finished shards: the
    rerun checks them against the shards as they are now (here: nothing left to score)."""
    syn = copy_of(scored, tmp_path)
    manifest_uri = os.path.join(scores_dir(syn), MANIFEST_JSON)
    storage.write_json_atomic(manifest_uri, storage.read_json(manifest_uri) | {"synthetic_complete": False})
    m = run_score(ScoreConfig(synthetic=syn, classifier=storage.read_json(manifest_uri)["classifier"]["run"],
                              **FAST))
    assert m["synthetic_complete"] is True and m["timings"]["images_this_run"] == 0
    assert os.path.exists(os.path.join(scores_dir(syn), SUCCESS))


@pytest.mark.e2e
def test_kill_during_scoring_then_rerun_scores_each_pair_once(generated, tmp_path):
    """SIGKILL `diffmix-ray score` (and the local Ray it started) once a score file is complete,
    duplicate a finished file as a retried write would, then run the same config again: files cut
    short are deleted, duplicates compacted, and only the pairs without a score are scored."""
    syn = copy_of(generated, tmp_path)
    out = scores_dir(syn)
    slow = tmp_path / "slow.yaml"
    slow.write_text("_batch_delay_s: 0.6\nrows_per_file: 2\nbatch_size: 2\n")  # 8 batches: ~5 s of scoring
    args = ["score", "--synthetic", syn, "--clip", "tiny", "--config", str(slow)]
    with cli_process(args, str(tmp_path / "log")) as proc:
        wait_for(lambda: proc.poll() is not None or readable_score_files(out), what="the first score file")
        assert proc.poll() is None, "the run ended before it could be killed"
    kept = readable_score_files(out)
    kept_ids = {i for n in kept for i in pq.read_table(os.path.join(out, n)).column("pair_id").to_pylist()}
    assert 0 < len(kept_ids) < PAIRS and not os.path.exists(os.path.join(out, SUCCESS))
    copied = pq.read_metadata(os.path.join(out, kept[0])).num_rows
    shutil.copy(os.path.join(out, kept[0]), os.path.join(out, "scores-copy.parquet"))

    run_score(ScoreConfig(synthetic=syn, clip="tiny", batch_size=2, rows_per_file=2))  # the same config, resumed here

    assert_one_score_per_pair(syn)
    m = storage.read_json(os.path.join(out, MANIFEST_JSON))
    assert m["counts"]["duplicates_removed"] >= copied
    assert m["timings"]["images_this_run"] == PAIRS - len(kept_ids)


def test_train_cls_keeps_what_the_filter_keeps_and_the_report_shows_it(scored, sample_dataset, tmp_path):
    """One generation serves every threshold: train-cls reads the scores beside the shards and trains on
    the images that pass (here: the upper half of the object score within each target class, and any
    classifier probability), records what it kept per class pair, and leaves shards and scores as
    they were; the report shows the scores' histograms, the lowest and highest images and the kept
    fraction."""
    import json

    from typer.testing import CliRunner

    from diffmix_ray.cli import app
    from diffmix_ray.orchestrate.report import run_report

    table = read_scores(scores_dir(scored))
    obj = table.column("clip_object_prob").to_numpy()
    src, tgt = table.column("source_label").to_numpy(), table.column("target_label").to_numpy()
    keep = np.zeros(len(obj), dtype=bool)
    for c in np.unique(tgt):
        keep[tgt == c] = obj[tgt == c] >= np.percentile(obj[tgt == c], 50)
    expected = {}
    for s, t, k in zip(src.tolist(), tgt.tolist(), keep.tolist()):
        kept, total = expected.get((s, t), (0, 0))
        expected[(s, t)] = (kept + k, total + 1)
    before = tree_state(scores_dir(scored)), tree_state(os.path.join(scored, SHARDS_DIR))

    out = tmp_path / "filtered"
    result = CliRunner().invoke(app, [
        "train-cls", "--dataset", sample_dataset, "--synthetic", scored, "--arch", "test_resnet", "--out", str(out),
        "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--synthetic-p", "0.5",
        "--synthetic-filter", "clip_object_prob:p50-100@class", "--synthetic-filter", "classifier_target_prob>=0",
        "--scores", "default"])
    assert result.exit_code == 0, result.output

    f = json.loads((out / "metrics.json").read_text())["synthetic_filter"]
    assert f["conditions"] == ["clip_object_prob:p50-100@class", "classifier_target_prob>=0"]
    assert (f["kept"], f["total"]) == (int(keep.sum()), PAIRS) and 0 < f["kept"] < PAIRS
    assert f["passed"] == {"clip_object_prob:p50-100@class": int(keep.sum()), "classifier_target_prob>=0": PAIRS}
    assert {(p["source"], p["target"]): (p["kept"], p["total"]) for p in f["pairs"]} == expected
    used = f["scores"][0]
    assert used["fingerprint"] == storage.read_json(os.path.join(scores_dir(scored), RUN_JSON))["config_hash"]
    assert (used["name"], used["clip"], used["complete"], used["without_score"]) == ("default", "tiny", True, 0)
    assert f"kept {f['kept']} of {PAIRS} synthetic images" in " ".join(result.output.split())
    assert storage.read_json(str(out / RUN_JSON))["config"]["scores_fingerprints"]  # other scores, another run
    assert (tree_state(scores_dir(scored)), tree_state(os.path.join(scored, SHARDS_DIR))) == before

    report = tmp_path / "report"
    run_report([scored, str(out)], str(report))
    assert {"contact-syn.png", "scores.png", "scores-syn-by-class.png", "scores-syn-extremes.png", "accuracy.png",
            "comparison.md"} <= set(os.listdir(report))
    assert (f"| filtered | clip_object_prob:p50-100@class, classifier_target_prob>=0 | syn/default | {f['kept']} | "
            f"{PAIRS} | {100 * f['kept'] / PAIRS:.1f} |") in (report / "comparison.md").read_text()
    # a scores folder has a manifest.json too: given alone, it is read as scores, not as a generate output
    written = run_report([scores_dir(scored)], str(tmp_path / "report2"))
    assert "contact_sheets" not in written and len(written["score_plots"]) == 3
