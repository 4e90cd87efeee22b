"""train-cls: soft labels and mixing (no Ray), label bookkeeping end to end, val selection,
resume after a killed worker, bad inputs, evaluate and report; the recipe options (image pipelines,
schedules, losses, --select, shot thresholds, long-tail defaults) as functions, then one run on Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffmix_ray.classify import labels as lab
from diffmix_ray.classify.config import ClassifyConfig
from diffmix_ray.classify.run import run_classify
from diffmix_ray.classify.summary import summarize
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


def test_own_source_replacement_takes_one_of_the_images_own_translations():
    """DA-Fusion's mixing: a replaced real image becomes one of its own translations; an image with
    none stays real; text-to-image rows (no source) are never drawn."""
    real_ids = [f"r{i}" for i in range(50)]
    source_ids = [f"r{i}" for i in range(40) for _ in range(10)] + [None] * 5 + ["not-a-train-image"]
    order_of_rows = np.random.default_rng(0).permutation(len(source_ids))  # rows in no particular order
    source_ids = [source_ids[k] for k in order_of_rows]
    own = lab.own_index(real_ids, source_ids)
    hits, picked = 0, {i: set() for i in range(40)}
    for epoch in range(20):
        order, rep = lab.epoch_mix(50, len(source_ids), 0.5, None, seed=1, epoch=epoch, own=own)
        for k in np.flatnonzero(rep >= 0):
            assert source_ids[rep[k]] == real_ids[order[k]]  # its own translation, nobody else's
            picked[order[k]].add(int(rep[k]))
        assert not (rep[order >= 40] >= 0).any()  # images without translations stay real
        hits += int((rep >= 0).sum())
    assert abs(hits / (20 * 40) - 0.5) < 0.06  # alpha = 0.5 of the images that have translations
    assert min(len(v) for v in picked.values()) >= 3  # drawn among its translations, not always the first
    again = lab.epoch_mix(50, len(source_ids), 0.5, None, seed=1, epoch=3, own=own)
    assert all((a == b).all() for a, b in zip(again, lab.epoch_mix(50, len(source_ids), 0.5, None, 1, 3, own)))


def test_selection_uses_val_not_test():
    history = [{"epoch": e, "val": {"top1": v, "per_class": [v]}, "test": {"top1": t, "per_class": [t]}}
               for e, (v, t) in enumerate([(0.5, 0.9), (0.8, 0.6), (0.7, 0.95), (0.8, 0.99)])]
    s = summarize(history, [10], "val")
    assert s["selected_epoch"] == 1 and s["test_top1"] == 0.6  # best test (0.99) is NOT what is reported
    assert "test_shot_groups" not in s  # no thresholds: not a long-tail run


def test_long_tail_shot_groups():
    history = [{"epoch": 0, "val": {"top1": 1.0, "per_class": []},
                "test": {"top1": 0.5, "per_class": [1.0, 0.5, 0.0, 0.25]}}]
    s = summarize(history, [30, 10, 2, 3], "val", (20, 5))
    assert s["test_shot_groups"] == {"many": 1.0, "medium": 0.5, "few": 0.125}
    assert s["shot_thresholds"] == {"many": 20, "few": 5}
    # other thresholds regroup the same accuracies: 30 and 10 many, 2 and 3 medium, no class few
    assert summarize(history, [30, 10, 2, 3], "val", (9, 2))["test_shot_groups"] == \
        {"many": 0.75, "medium": 0.125, "few": None}


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


@pytest.mark.parametrize("kw, msg", [
    (dict(synthetic_pick="own"), "--synthetic-pick 'own': choose pool .* or own-source"),
    (dict(synthetic_pick="own-source"), "--synthetic-pick own-source replaces real images by their own translations: "
                                        "pass --synthetic"),
    (dict(synthetic_pick="own-source", synthetic=("x",), synthetic_sampling="uniform"),
     "--synthetic-sampling uniform chooses among all synthetic images; --synthetic-pick own-source"),
])
def test_bad_synthetic_pick(shapes, tmp_path, kw, msg):
    with pytest.raises(DiffmixError, match=msg):
        run_classify(cfg(shapes, tmp_path / "o", **kw))


def test_own_source_without_translations_of_the_train_images_is_refused(shapes, tmp_path):
    """Text-to-image shards have no source image: no real image has its own translation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    syn = fx.fake_synthetic(str(tmp_path / "gen"), shapes, 1.0)
    shard = os.path.join(syn, "shards", "shard-fake-00000.parquet")
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index("source_id"), table.schema.field("source_id"),
                                    pa.nulls(table.num_rows, pa.string())), shard)
    with pytest.raises(DiffmixError, match="no train image of .* has a translation in"):
        run_classify(cfg(shapes, tmp_path / "o", synthetic=(syn,), synthetic_pick="own-source"))
    assert not os.path.exists(tmp_path / "o")  # refused before the output was claimed


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


def test_dataset_without_val_needs_select_last(tmp_path):
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    ds = str(tmp_path / "ds")
    prepare(PrepareConfig("imagefolder", fx.make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4}),
                          super_class="x", val_fraction=0.0), ds, show_progress=False)
    with pytest.raises(DiffmixError, match="has no val split.*--select last.*--val-fraction > 0"):
        run_classify(cfg(ds, tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before the output was claimed


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


# ---------------------------------------------------------------------------------------------
# Recipes as functions (no Ray): image pipelines, schedules, losses, selection, thresholds,
# long-tail defaults, bad images
# ---------------------------------------------------------------------------------------------
def _steps(d, training):
    from diffmix_ray.classify.transforms import pipeline

    return [line.strip() for line in repr(pipeline(d, training)).splitlines()[1:-1]]


@pytest.mark.parametrize("res_mode, resize, crop", [(224, 256, 224), (384, 440, 384), (448, 512, 448)])
def test_reference_pipeline(res_mode, resize, crop):
    from PIL import Image

    from diffmix_ray.classify.transforms import data_config, pipeline

    d = data_config("test_resnet", "reference", None, res_mode)
    norm = "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
    assert _steps(d, True) == [
        f"Resize(size=({resize}, {resize}), interpolation=bilinear, max_size=None, antialias=True)",
        f"RandomCrop(size=({crop}, {crop}), padding=8)", "RandomHorizontalFlip(p=0.5)", "ToTensor()", norm]
    assert _steps(d, False) == [
        f"Resize(size=({resize}, {resize}), interpolation=bilinear, max_size=None, antialias=True)",
        f"CenterCrop(size=({crop}, {crop}))", "ToTensor()", norm]
    img = Image.new("RGB", (300, 170), (10, 200, 30))  # not square: Resize((r, r)) squashes it
    for training in (True, False):
        assert tuple(pipeline(d, training)(img).shape) == (3, crop, crop)


def test_long_tail_and_timm_pipelines():
    from PIL import Image

    from diffmix_ray.classify.transforms import data_config, pipeline

    lt = data_config("test_resnet", "reference-lt", None, None)
    train, evals = _steps(lt, True), _steps(lt, False)
    assert train[0].startswith("RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0)")
    assert train[1:3] == ["RandomHorizontalFlip(p=0.5)",
                          "ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=None)"]
    assert evals[:2] == ["Resize(size=256, interpolation=bilinear, max_size=None, antialias=True)",
                         "CenterCrop(size=(224, 224))"]  # shorter side to 256, not a square
    tm = data_config("test_resnet", "timm", 40, None)  # timm's own: the architecture's normalisation
    assert _steps(tm, True)[0].startswith("RandomResizedCropAndInterpolation(size=(40, 40)")
    img = Image.new("RGB", (300, 170))
    for d in (lt, tm):
        # every pipeline ends with the one step that makes the model's input, normalisation last
        assert _steps(d, True)[-2:] == _steps(d, False)[-2:] == [
            "ToTensor()", f"Normalize(mean={tuple(d['mean'])}, std={tuple(d['std'])})"]
        for training in (True, False):
            assert tuple(pipeline(d, training)(img).shape) == (3, d["img_size"], d["img_size"])


@pytest.mark.parametrize("kw, msg", [
    (dict(augment="reference", img_size=224), "--img-size is the input size of --augment timm.*--res-mode"),
    (dict(res_mode=384), "--res-mode 384 sets the reference pipelines.*--img-size"),
    (dict(augment="reference", img_size=None, res_mode=300), "--res-mode 300: choose 224 or 384 or 448"),
    (dict(augment="autoaugment"), "--augment 'autoaugment': choose timm or reference or reference-lt"),
    (dict(warmup_epochs=1.0, warmup_fraction=0.1), "give the warm-up once"),
    (dict(warmup_epochs=None, warmup_fraction=1.0), r"--warmup-fraction 1.0 is a share of all steps: it must be in \[0, 1\)"),
    (dict(schedule="step", lr_milestones="4,2"), "--lr-milestones 4,2 must be increasing epochs between 1 and 4"),
    (dict(schedule="step", lr_milestones="2,5"), "must be increasing epochs between 1 and 4 .*never apply"),
    (dict(lr_milestones="2,3"), "--lr-milestones belong to --schedule step"),
    (dict(schedule="step", lr_milestones="a,b"), "--lr-milestones 'a,b' must be whole numbers"),
    (dict(drw_epoch=2), "--drw-epoch belongs to --loss drw"),
    (dict(loss="drw", drw_epoch=5), r"--drw-epoch 5 must be in \[0, --epochs 5\)"),
    (dict(loss="focal"), "--loss 'focal': choose ce or drw or balanced-softmax"),
    (dict(select="best"), "--select 'best': choose val or last"),
    (dict(lr_scaling="sqrt"), "--lr-scaling 'sqrt': choose none or linear"),
    (dict(shot_thresholds="5,20"), "--shot-thresholds 5,20 is out of order: give MANY first, larger than FEW"),
    (dict(shot_thresholds="20"), "--shot-thresholds '20' must be two whole numbers MANY,FEW"),
    (dict(shot_thresholds=[20.5, 5]), "must be two whole numbers"),
])
def test_bad_recipe_options(tmp_path, kw, msg):
    with pytest.raises(DiffmixError, match=msg):
        cfg("unused", tmp_path / "o", **kw).validate()


def test_cosine_schedule_lr_at_steps():
    from diffmix_ray.classify import schedule as sch

    warm, why = sch.warmup_epochs("cosine", 10, None, None)  # the reference's 10% of all steps
    assert warm == 1.0 and "0.1 of all steps" in why
    s = sch.Schedule("cosine", 0.1, steps_per_epoch=10, epochs=10, warmup_epochs=warm)
    assert (s.total_steps, s.warmup_steps) == (100, 10)
    cos = lambda t: 0.5 * (1 + np.cos(np.pi * t / 100))  # noqa: E731
    assert s.lr(0) == pytest.approx(0.1 * 0.1 * cos(0))  # first step: 1/W of the rate
    assert s.lr(4) == pytest.approx(0.1 * 0.5 * cos(4))
    assert s.lr(9) == pytest.approx(0.1 * cos(9))  # warm-up done
    assert s.lr(50) == pytest.approx(0.05) and s.lr(99) == pytest.approx(0.1 * cos(99))
    assert s.lr(100) == pytest.approx(0.0, abs=1e-12)
    assert sch.Schedule("cosine", 0.1, 10, 10, 0.0).lr(0) == pytest.approx(0.1)  # no warm-up
    # --warmup-fraction 0.25 of 10 epochs x 4 steps = 10 steps; --warmup-epochs 2 = 8
    assert sch.Schedule("cosine", 1.0, 4, 10, sch.warmup_epochs("cosine", 10, None, 0.25)[0]).warmup_steps == 10
    assert sch.Schedule("cosine", 1.0, 4, 10, sch.warmup_epochs("cosine", 10, 2.0, None)[0]).warmup_steps == 8


def test_step_schedule_is_the_long_tail_trainers():
    from diffmix_ray.classify import schedule as sch

    def reference(epoch, lr):  # the Diff-Mix long-tail trainer's adjust_learning_rate, as written there
        epoch = epoch + 1
        if epoch <= 5:
            return lr * epoch / 5
        if epoch > 180:
            return lr * 0.0001
        if epoch > 160:
            return lr * 0.01
        return lr

    warm, _ = sch.warmup_epochs("step", 200, None, None)
    assert warm == 5.0 and sch.default_milestones(200) == (160, 180)
    s = sch.Schedule("step", 0.005, steps_per_epoch=3, epochs=200, warmup_epochs=warm,
                     milestones=sch.default_milestones(200), decay=0.01)
    for epoch in range(200):
        for step in range(3 * epoch, 3 * epoch + 3):  # constant within an epoch
            assert s.lr(step) == pytest.approx(reference(epoch, 0.005), rel=1e-9), (epoch, step)
    assert sch.default_milestones(30) == (24, 27)  # the same shares of a shorter run
    custom = sch.Schedule("step", 1.0, 1, 10, 0.0, milestones=(3, 7), decay=0.1)
    assert [custom.lr(e) for e in (0, 2, 3, 6, 7, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert sch.scaled_lr(0.1, "linear", 512, 256) == pytest.approx(0.2)
    assert sch.scaled_lr(0.1, "none", 512, 256) == 0.1


def test_losses_on_soft_targets():
    import torch
    import torch.nn.functional as F

    from diffmix_ray.classify import losses as L

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2, 1])
    onehot = F.one_hot(labels, 3).float()
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [0.1, 0.8, 0.1]])
    logp = F.log_softmax(logits, 1)
    counts = [100, 10, 1]
    # ce: the expected negative log-likelihood under the target, averaged over the batch
    assert L.soft_ce(logits, soft) == pytest.approx(float(-(soft * logp).sum(1).mean()))
    assert L.soft_ce(logits, onehot) == pytest.approx(float(F.cross_entropy(logits, labels)))
    # balanced softmax: the same on logits shifted by log prior; one-hot = the reference's loss
    prior = torch.log(torch.tensor(counts, dtype=torch.float32) / 111)
    crit = L.Criterion("balanced-softmax", counts)
    assert crit.for_epoch(0)(logits, onehot, labels) == pytest.approx(float(F.cross_entropy(logits + prior, labels)))
    assert crit.for_epoch(0)(logits, soft, labels) == pytest.approx(
        float(-(soft * F.log_softmax(logits + prior, 1)).sum(1).mean()))
    # drw: plain ce before the epoch; class-balanced weights from it
    w = L.drw_weights(counts, 0.9999)
    raw = (1 - 0.9999) / (1 - 0.9999 ** np.array(counts, dtype=float))
    assert np.allclose(w, raw / raw.sum() * 3) and w.sum() == pytest.approx(3) and w[2] > w[1] > w[0]
    wt = torch.tensor(w, dtype=torch.float32)
    hard, soft_drw = L.Criterion("drw", counts, 4, hard_labels=True), L.Criterion("drw", counts, 4)
    assert hard.for_epoch(3)(logits, onehot, labels) == pytest.approx(float(F.cross_entropy(logits, labels)))
    # hard labels: PyTorch's weighted mean, sum w_y l / sum w_y
    assert hard.for_epoch(4)(logits, onehot, labels) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=wt)))
    # soft targets: sum_c w_c y_c (-log p_c), averaged over the batch (PyTorch's rule for probabilities)
    expected = float(-(wt * soft * logp).sum(1).mean())
    assert soft_drw.for_epoch(9)(logits, soft, labels) == pytest.approx(expected)
    assert soft_drw.for_epoch(9)(logits, soft, labels) == pytest.approx(
        float(F.cross_entropy(logits, soft, weight=wt)))
    with pytest.raises(DiffmixError, match=r"--loss drw weights classes by their train images, but class\(es\) \[1\]"):
        L.Criterion("drw", [5, 0, 3], 1)


def _info(kind=None, counts=(30, 10, 2, 1), splits=("train", "val", "test"), thresholds=None):
    from diffmix_ray.contracts import DatasetInfo

    per = {s: {str(c): (n if s == "train" else 2) for c, n in enumerate(counts)} for s in splits}
    subset = {"kind": kind, "imbalance_ratio": 30} if kind else {}
    return DatasetInfo(name="d", classes=[f"c{i}" for i in range(len(counts))], super_class="x", counts=per,
                       files={s: [f"{s}-0.parquet"] for s in splits}, source={}, subset=subset, skipped={},
                       fingerprint="f" * 64, shot_thresholds=thresholds)


def test_long_tail_defaults_follow_the_paper(tmp_path):
    from diffmix_ray.classify.recipe import resolve

    lt = _info("long-tail", thresholds={"many": 20, "few": 5})
    r = resolve(cfg("d", tmp_path, batch_size=4), lt, 43, 100)
    assert (r.synthetic_sampling, r.p, r.thresholds) == ("inverse-frequency", 0.3, (20, 5))
    assert r.resolved["synthetic_sampling"] == {"value": "inverse-frequency",
                                                "from": "default for long-tailed datasets (the paper's)"}
    assert r.resolved["shot_thresholds"] == {"value": {"many": 20, "few": 5}, "from": "dataset.json"}
    assert any("∝ 1/(n_c + 1), the paper's default" in n for n in r.notes)
    told = resolve(cfg("d", tmp_path, batch_size=4, synthetic_sampling="uniform", shot_thresholds="25,3"), lt, 43, 100)
    assert (told.synthetic_sampling, told.thresholds) == ("uniform", (25, 3))
    assert not any("n_c + 1" in n for n in told.notes)
    balanced = resolve(cfg("d", tmp_path, batch_size=4), _info(None), 43, 100)
    assert (balanced.synthetic_sampling, balanced.p, balanced.thresholds) == ("uniform", 0.1, None)
    assert resolve(cfg("d", tmp_path, batch_size=4), _info("long-tail"), 43, 0).thresholds == (20, 5)  # no record
    r = resolve(cfg("d", tmp_path, batch_size=4, loss="drw", epochs=200, schedule="step", lr=0.1,
                    lr_scaling="linear", lr_base_batch=2, workers=2, warmup_epochs=None), lt, 43, 0)
    assert r.drw_epoch == 160 and r.schedule.milestones == (160, 180) and r.hard_labels is False  # smoothing 0.1
    assert r.schedule.peak_lr == pytest.approx(0.4) and r.schedule.steps_per_epoch == 5  # 43 // 2 // 4
    assert r.resolved["warmup_epochs"]["value"] == 5.0


def test_long_tail_options_on_a_balanced_dataset_are_said_to_change_nothing(tmp_path):
    from diffmix_ray.classify.recipe import resolve

    even = _info(None, counts=(8, 8, 8, 8))
    r = resolve(cfg("d", tmp_path, batch_size=4, loss="balanced-softmax", synthetic_sampling="inverse-frequency"),
                even, 32, 10)
    assert any("--loss balanced-softmax (on equal counts it is plain cross-entropy) and --synthetic-sampling "
               "inverse-frequency (equal weights 1/(n_c + 1): uniform): every class has 8 train images" in n
               for n in r.notes)
    assert not any("change nothing" in n for n in resolve(cfg("d", tmp_path, batch_size=4, loss="drw"),
                                                          _info("long-tail"), 43, 0).notes)


def test_select_and_missing_splits(tmp_path):
    from diffmix_ray.classify.recipe import check_splits
    from diffmix_ray.classify.summary import mean_std, result_line

    no_val = _info(splits=("train", "test"))
    with pytest.raises(DiffmixError, match="has no val split.*--select last"):
        check_splits(cfg("d", tmp_path), no_val, "ds")
    assert check_splits(cfg("d", tmp_path, select="last"), no_val, "ds") is None
    line = check_splits(cfg("d", tmp_path, select="last"), _info(), "ds")
    assert "--select last" in line and "val split (8 images)" in line and "not trained on" in line
    history = [{"epoch": e, "val": {"top1": v, "per_class": [v]}, "test": None} for e, v in enumerate([0.5, 0.9, 0.7])]
    s = summarize(history, [10], "last", (20, 5))
    assert (s["selected_epoch"], s["val_top1"], s["test_top1"], s["test_per_class"]) == (2, 0.7, None, None)
    assert s["missing_splits"] == ["test"] and s["test_shot_groups"] is None and s["select"] == "last"
    assert "no test score: the dataset has no test split" in result_line(s) and "0.000" not in result_line(s)
    assert summarize(history, [10], "val")["selected_epoch"] == 1
    assert mean_std([0.8, None]) == (None, None) and mean_std([0.8, 0.6]) == pytest.approx((0.7, 0.1))  # over seeds


def test_bad_image_names_its_file_and_row():
    import pyarrow as pa

    from diffmix_ray.classify.data import images_of
    from diffmix_ray.classify.transforms import data_config, pipeline

    column = pa.array([fx.image_bytes(), b"not an image at all"], pa.binary())
    tf = pipeline(data_config("test_resnet", "reference", None, None), False)
    assert images_of({0: column}, np.array([0]), np.array([0]), ["s3://b/x.parquet"], tf).shape == (1, 3, 224, 224)
    with pytest.raises(DiffmixError) as err:
        images_of({0: column}, np.array([0, 0]), np.array([0, 1]), ["s3://b/x.parquet"], tf)
    assert "row 1 of s3://b/x.parquet" in str(err.value) and "BytesIO" not in str(err.value)


def test_report_without_test_split(tmp_path, monkeypatch):
    from matplotlib.ticker import MaxNLocator

    from diffmix_ray.orchestrate import report

    epochs = [{"epoch": e, "val": {"top1": 0.5 + e / 10, "per_class": [0.5]}, "test": None} for e in range(3)]
    run = {"arch": "a", "p": 0.0, "gamma": 0.5, "synthetic": [], "epochs": epochs,
           "summary": summarize(epochs, [10], "last")}
    header, body, notes = report.comparison_rows([("r", run)])
    row = dict(zip(header, body[0]))
    assert (row["select"], row["epoch"], row["val top-1"], row["test top-1"]) == ("last", "2", "70.00", "—")
    assert any("no test split" in n for n in notes) and any("select last" in n for n in notes)
    figs = []
    monkeypatch.setattr(report, "_save_png", lambda fig, uri: figs.append(fig))
    report.accuracy_plot([("r", run)], str(tmp_path / "a.png"))
    ax = figs[0].axes[0]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator) and ax.xaxis.get_major_locator()._integer
    assert [line.get_label() for line in ax.lines] == ["r val"]  # no test curve drawn at 0


# ---------------------------------------------------------------------------------------------
# The recipe options on Ray Train: one run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_no_test(tmp_path_factory):
    """Train and val only (imagefolder without a test folder and --test-fraction 0)."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.data.sample import write_sample_imagefolder

    root = tmp_path_factory.mktemp("shapes-no-test")
    raw = write_sample_imagefolder(str(root / "raw"), num_classes=4, per_class=12, seed=7, size=48)
    prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0.25), str(root / "ds"),
            show_progress=False)
    return str(root / "ds")


def test_reference_recipe_on_a_dataset_without_test(ray_local, shapes_no_test, tmp_path):
    """--augment reference, --schedule step, --loss balanced-softmax and --select last on a dataset
    without a test split: the run says what it ignores, scores nothing on test (null, never 0),
    follows the schedule, and `evaluate` and `report` agree with it."""
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train-cls", "--dataset", shapes_no_test, "--arch", "test_resnet", "--out", str(out), "--augment", "reference",
        "--epochs", "3", "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.01", "--schedule", "step",
        "--warmup-epochs", "2", "--lr-milestones", "2", "--lr-decay", "0.1", "--loss", "balanced-softmax",
        "--select", "last", "--seed", "0"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # the console wraps long lines
    assert "augment: reference pipeline, res mode 224 (resize 256 -> crop 224)" in said
    assert "--select last: reporting the final epoch; the val split (12 images)" in said
    assert "final epoch 2 (--select last)" in said and "no test score: the dataset has no test split" in said
    m = json.loads((out / "metrics.json").read_text())
    assert (m["select"], m["loss"], m["splits"]) == ("last", "balanced-softmax", ["train", "val"])
    assert m["summary"]["selected_epoch"] == 2 and m["summary"]["test_top1"] is None
    assert all(e["test"] is None for e in m["epochs"]) and m["summary"]["missing_splits"] == ["test"]
    assert [e["lr"] for e in m["epochs"]] == pytest.approx([0.005, 0.01, 0.001])  # warm-up 2, x0.1 from epoch 2
    assert m["resolved"]["select"]["value"] == "last" and m["resolved"]["augment"]["value"]["img_size"] == 224
    best = json.loads((out / "best" / "model.json").read_text())
    assert best["epoch"] == 2 and best["data_cfg"]["augment"] == "reference"  # the last epoch's weights

    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(out), "--dataset", shapes_no_test, "--split", "val"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(m["epochs"][-1]["val"]["top1"])
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(out), "--dataset", shapes_no_test])
    assert res.exit_code == 2 and "has no 'test' split to evaluate on; it has train, val" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert f"| last | 2 | {100 * m['summary']['val_top1']:.2f} | — |" in table  # test: no score, not 0.00
    assert "run: its dataset has no test split" in table
