"""train-cls: soft labels and mixing (no Ray), label bookkeeping end to end, val selection,
resume after a killed worker, bad inputs, evaluate and report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffmix_ray.classify import labels as lab
from diffmix_ray.classify.config import ClassifyConfig
from diffmix_ray.classify.run import run_classify, summarize
from diffmix_ray.errors import DiffmixError

from . import fixtures as fx


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
def test_soft_label_formula():
    y = lab.soft_labels(np.array([0, 2, 1, 3]), np.array([1, 0, 1, 3]), np.array([0.7, 0.25, 0.5, 0.0]), 0.5, 4)
    assert np.allclose(y[0], [1 - 0.7 ** 0.5, 0.7 ** 0.5, 0, 0])
    assert np.allclose(y[1], [0.5, 0, 0.5, 0])  # 0.25^0.5 = 0.5
    assert np.allclose(y[2], [0, 1, 0, 0])  # intra-class: one-hot whatever the strength
    assert np.allclose(y[3], [0, 0, 0, 1])  # real sample: strength 0
    assert np.allclose(y.sum(1), 1)
    sm = lab.smooth(y, 0.1)
    assert np.allclose(sm.sum(1), 1) and np.isclose(sm[2, 1], 0.9 + 0.1 / 4) and np.isclose(sm[2, 0], 0.025)


def test_replacement_rate_is_p():
    total, replaced = 0, 0
    for epoch in range(20):
        order, rep = lab.epoch_mix(1000, 300, 0.3, None, seed=1, epoch=epoch)
        assert sorted(order) == list(range(1000))  # every real row once per epoch
        total += 1000
        replaced += int((rep >= 0).sum())
    rate = replaced / total  # 20k Bernoulli(0.3) draws: std 0.0032
    assert abs(rate - 0.3) < 0.015
    a, b = lab.epoch_mix(100, 10, 0.5, None, seed=1, epoch=3), lab.epoch_mix(100, 10, 0.5, None, seed=1, epoch=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (lab.epoch_mix(100, 10, 0.5, None, 1, 4)[1] == a[1]).all()


def test_inverse_frequency_synthetic_sampling():
    real_counts = np.array([30, 10, 2])
    targets = np.array([0] * 50 + [1] * 30 + [2] * 20)
    w = lab.synthetic_row_weights(targets, 3, "inverse-frequency", real_counts)
    per_class = np.array([w[targets == c].sum() for c in range(3)])
    expected = (1 / (real_counts + 1)) / (1 / (real_counts + 1)).sum()
    assert np.allclose(per_class, expected) and np.allclose(w[targets == 2], w[targets == 2][0])
    _, rep = lab.epoch_mix(20000, 100, 1.0, w, seed=0, epoch=0)
    drawn = np.bincount(targets[rep], minlength=3) / 20000
    assert np.allclose(drawn, expected, atol=0.02)
    assert np.allclose(lab.synthetic_row_weights(targets, 3, "uniform", real_counts), 1 / 100)


def test_selection_uses_val_not_test():
    history = [{"epoch": e, "val": {"top1": v, "per_class": [v]}, "test": {"top1": t, "per_class": [t]}}
               for e, (v, t) in enumerate([(0.5, 0.9), (0.8, 0.6), (0.7, 0.95), (0.8, 0.99)])]
    s = summarize(history, [10], ClassifyConfig(dataset="d", arch="test_resnet", out="o"), long_tail=False)
    assert s["selected_epoch"] == 1 and s["test_top1"] == 0.6  # best test (0.99) is NOT what is reported


def test_long_tail_shot_groups():
    history = [{"epoch": 0, "val": {"top1": 1.0, "per_class": []},
                "test": {"top1": 0.5, "per_class": [1.0, 0.5, 0.0, 0.25]}}]
    s = summarize(history, [30, 10, 2, 3], ClassifyConfig(dataset="d", arch="test_resnet", out="o"), long_tail=True)
    assert s["test_shot_groups"] == {"many": 1.0, "medium": 0.5, "few": 0.125}


# ---------------------------------------------------------------------------------------------
# Bad input: each refused before any worker starts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Clearly separable classes (a colour and a shape each), 30 images per class."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import write_sample_imagefolder

    root = tmp_path_factory.mktemp("shapes")
    raw = write_sample_imagefolder(str(root / "raw"), num_classes=4, per_class=30, seed=7, size=48)
    prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0.2, test_fraction=0.2),
            str(root / "ds"), show_progress=False)
    return str(root / "ds")


def cfg(shapes, out, **kw):
    base = dict(dataset=shapes, arch="test_resnet", out=str(out), img_size=32, epochs=5, batch_size=8, lr=0.01,
                optimizer="adamw", weight_decay=0.0, warmup_epochs=0.0, cpus_per_worker=1.0, seed=0)
    return ClassifyConfig(**(base | kw))


@pytest.mark.parametrize("kw, msg", [
    (dict(arch="resnet_9000"), "--arch 'resnet_9000' is not a timm architecture"),
    (dict(synthetic_p=1.5), r"--synthetic-p 1.5 is a probability: it must be in \[0, 1\]"),
    (dict(synthetic_p=-0.1), "must be in"),
])
def test_bad_options(shapes, tmp_path, kw, msg):
    with pytest.raises(DiffmixError, match=msg):
        run_classify(cfg(shapes, tmp_path / "o", **kw))


def test_synthetic_from_another_dataset_is_refused(shapes, sample_dataset, tmp_path):
    syn = fx.fake_synthetic(str(tmp_path / "syn"), sample_dataset, 0.1)
    with pytest.raises(DiffmixError, match="generated from another dataset"):
        run_classify(cfg(shapes, tmp_path / "o", synthetic=(syn,)))


def test_incomplete_synthetic_needs_allow_incomplete(shapes, tmp_path):
    syn = fx.fake_synthetic(str(tmp_path / "syn"), shapes, 0.1, complete=False, missing=5)
    with pytest.raises(DiffmixError, match="incomplete.*5 of 77 planned pairs are missing.*--allow-incomplete"):
        run_classify(cfg(shapes, tmp_path / "o", synthetic=(syn,)))


def test_pretrained_for_another_arch_is_refused(shapes, tmp_path):
    import timm
    import torch

    path = str(tmp_path / "vit.pth")
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), path)
    with pytest.raises(DiffmixError, match="does not fit --arch test_resnet"):
        run_classify(cfg(shapes, tmp_path / "o", pretrained=path))


def test_dataset_without_val_is_refused(tmp_path):
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    ds = str(tmp_path / "ds")
    prepare(PrepareConfig("imagefolder", fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4}),
                          super_class="x", val_fraction=0.0), ds, show_progress=False)
    with pytest.raises(DiffmixError, match="has no val split.*--val-fraction"):
        run_classify(cfg(ds, tmp_path / "o"))


def test_pretrained_local_weights_load(shapes, tmp_path):
    import timm
    import torch

    from diffmix_ray.classify.model import build_model

    path = str(tmp_path / "r.pth")
    src = timm.create_model("test_resnet", num_classes=1000)
    torch.save(src.state_dict(), path)
    model = build_model("test_resnet", 4, path)  # the 1000-class head is replaced by a 4-class one
    assert model.get_classifier().out_features == 4
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)


# ---------------------------------------------------------------------------------------------
# End to end on Ray Train
# ---------------------------------------------------------------------------------------------
def test_label_bookkeeping_end_to_end(ray_local, shapes, tmp_path):
    """Synthetic-only training (p = 1) on low-strength shards (images = sources, soft labels from
    the shards) matches the real baseline; with the shards' labels shuffled it falls to chance."""
    real = run_classify(cfg(shapes, tmp_path / "real"))["summary"]["test_top1"]
    good = fx.fake_synthetic(str(tmp_path / "good"), shapes, 0.04)
    bad = fx.fake_synthetic(str(tmp_path / "bad"), shapes, 0.04, shuffle_labels=True, seed=3)
    syn = run_classify(cfg(shapes, tmp_path / "syn", synthetic=(good,), synthetic_p=1.0))["summary"]["test_top1"]
    shuf = run_classify(cfg(shapes, tmp_path / "shuf", synthetic=(bad,), synthetic_p=1.0))["summary"]["test_top1"]
    assert real >= 0.75, real
    assert syn >= real - 0.15, (syn, real)
    assert shuf <= 0.45, shuf  # 4 classes: chance is 0.25


def test_killed_worker_resumes_from_epoch_checkpoint(ray_local, shapes, tmp_path):
    out = tmp_path / "ft"
    metrics = run_classify(cfg(shapes, out, epochs=3, workers=2, cpus_per_worker=0.5, _fail_at_epoch=1))
    assert os.path.exists(out / "failed-once")  # the worker really died once
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]  # each epoch exactly once
    assert (out / "_SUCCESS").exists() and (out / "best" / "model.pt").exists()
    # a rerun of the finished run is a no-op; another config is refused
    assert run_classify(cfg(shapes, out, epochs=3, workers=2, cpus_per_worker=0.5))["summary"] == metrics["summary"]
    with pytest.raises(DiffmixError, match="different config"):
        run_classify(cfg(shapes, out, epochs=4))


def test_evaluate_and_report(ray_local, shapes, tmp_path):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train-cls", "--dataset", shapes, "--arch", "test_resnet", "--out", str(out),
                                   "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--seed", "1"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(out), "--dataset", shapes, "--split", "test"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout.strip().splitlines()[-1])
    assert scored["top1"] == pytest.approx(metrics["summary"]["test_top1"])  # same weights, same data
    syn = fx.fake_synthetic(str(tmp_path / "syn"), shapes, 0.5)
    res = CliRunner().invoke(app, ["report", str(out), syn, "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    files = sorted(os.listdir(tmp_path / "report"))
    assert files == ["accuracy.png", "comparison.html", "comparison.md", "contact-syn.png"]
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "| run |" in table and f"{100 * metrics['summary']['test_top1']:.2f}" in table


def test_seeds_run_one_job_each_and_aggregate(tmp_path, monkeypatch):
    from diffmix_ray.classify import run as run_mod

    calls = []

    def fake_run(cfg, overwrite=False, resume=False):
        calls.append((cfg.seed, cfg.out))
        top = {2020: 0.80, 2021: 0.84, 2022: 0.82}[cfg.seed]
        return {"summary": {"test_top1": top, "val_top1": top + 0.01}}

    monkeypatch.setattr(run_mod, "run_classify", fake_run)
    base = ClassifyConfig(dataset="d", arch="test_resnet", out=str(tmp_path / "multi"))
    summary = run_mod.run_seeds(base, [2020, 2021, 2022])
    assert [s for s, _ in calls] == [2020, 2021, 2022]
    assert [os.path.basename(o) for _, o in calls] == ["seed-2020", "seed-2021", "seed-2022"]
    assert summary["test_top1_mean"] == pytest.approx(0.82)
    assert summary["test_top1_std"] == pytest.approx(np.std([0.80, 0.84, 0.82]))
    assert json.loads((tmp_path / "multi" / "summary.json").read_text())["seeds"] == [2020, 2021, 2022]
