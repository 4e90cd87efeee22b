"""The paper's protocol, second pass (no Ray): torchvision weights converted onto timm give the same
logits; a recipe that needs pretrained weights refuses to start without them; the reference's CutMix,
Mixup and CMO label arithmetic on soft labels; LDAM; incomplete last batches and CMO's minority stream;
DA-Fusion's per-class token schedule (a token whose class is absent from a step is left untouched);
and the recipes' values and `recipe show` summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmix_ray.cli import app
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """torchvision starts some tensors at zero (the ViT head, its class token) and BN statistics at 0/1:
    logits compared on those would agree whatever the mapping. Every tensor gets random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.02
                t.copy_(t.abs() + 0.5 + noise if name.endswith("running_var") else t + noise)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# convert-classifier: torchvision -> timm
# ---------------------------------------------------------------------------------------------
def test_resnet50_converted_gives_torchvisions_logits(tmp_path, two_threads):
    from torchvision.models import resnet50

    from diffmix_ray.classify.model import build_model, fingerprint

    tv = _randomise(resnet50(), 0)
    src = str(tmp_path / "resnet50-0676ba61.pth")
    torch.save(tv.state_dict(), src)
    out = tmp_path / "r50"
    res = CliRunner().invoke(app, ["model", "convert-classifier", src, str(out), "--arch", "resnet50"])
    assert res.exit_code == 0, res.output
    file = str(out / "model.safetensors")
    assert "wrote" in res.output and fingerprint(file)[:12] in res.output
    timm_model = build_model("resnet50", 1000, str(out)).eval()  # the folder, as --pretrained takes it
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = tv(x), timm_model(x)
    assert want.abs().max() > 0.1  # logits that a wrong mapping would change
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # converting again refuses to overwrite, and says how
    again = CliRunner().invoke(app, ["model", "convert-classifier", src, str(out), "--arch", "resnet50"])
    assert again.exit_code != 0 and "--overwrite" in _flat(again.output)


@pytest.mark.slow
def test_vit_b16_swag_at_384_converted_gives_torchvisions_logits(tmp_path, two_threads):
    """The reference's ViT: torchvision vit_b_16 at 384 px (IMAGENET1K_SWAG_E2E_V1's shape) onto timm
    vit_base_patch16_384: all 152 tensors mapped (strict load); logits equal on one image, on a ViT-B
    of 2 of its 12 blocks (every block is mapped alike; 12 would only make the test six times longer)."""
    from safetensors import safe_open
    from torchvision.models import vit_b_16
    from torchvision.models.vision_transformer import VisionTransformer

    import timm

    from diffmix_ray.classify.convert import convert_file, convert_state

    src = str(tmp_path / "vit_b_16_swag-9ac1b537.pth")
    torch.save(vit_b_16(image_size=384).state_dict(), src)
    file = convert_file(src, str(tmp_path / "vit.safetensors"), "vit_base_patch16_384")
    with safe_open(file, "pt") as f:
        assert f.metadata()["converted_from"] == "vit_b_16_swag-9ac1b537.pth" and len(f.keys()) == 152
    tv = _randomise(VisionTransformer(image_size=384, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768,
                                      mlp_dim=3072), 0)
    timm_model = timm.create_model("vit_base_patch16_384", depth=2).eval()
    timm_model.load_state_dict(convert_state(tv.state_dict(), "vit_base_patch16_384", depth=2))
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = tv(x), timm_model(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the 224 px ViT is not the reference's: refused for the 384 architecture, with the one that fits
    small = {k: v for k, v in vit_b_16().state_dict().items()}
    torch.save(small, str(tmp_path / "vit224.pth"))
    with pytest.raises(DiffmixError, match=r"197 tokens \(224 px input\).*--arch vit_base_patch16_224"):
        convert_file(str(tmp_path / "vit224.pth"), str(tmp_path / "x.safetensors"), "vit_base_patch16_384")
    with pytest.raises(DiffmixError, match="is a vit state dict and --arch is resnet50"):
        convert_file(src, str(tmp_path / "y.safetensors"), "resnet50")


# ---------------------------------------------------------------------------------------------
# Pretrained weights: never silently random
# ---------------------------------------------------------------------------------------------
def test_a_recipe_naming_pretrained_weights_refuses_to_start_without_them(tmp_path):
    from diffmix_ray.orchestrate import recipes
    from diffmix_ray.orchestrate.run import run_recipe

    r = recipes.load("conventional-cub-resnet50-448")
    assert "IMAGENET1K_V1" in r.weights["name"] and "convert-classifier" in r.weights["how"]
    out = tmp_path / "o"
    cub = fx.make_cub(str(tmp_path / "CUB_200_2011"), num_classes=2, per_class=2)
    with pytest.raises(DiffmixError) as e:
        run_recipe(r, str(out), data=cub, model="tiny", methods=["real-only"])
    said = _flat(str(e.value))
    assert "--pretrained resnet50-imagenet1k-v1.safetensors" in said and "--pretrained none" in said
    assert "convert-classifier" in said and not out.exists()
    # weights that do not fit the recipe's architecture are refused before any work, naming the file
    bad = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(DiffmixError, match="does not fit --arch resnet50"):
        run_recipe(r, str(out), data=cub, model="tiny", methods=["real-only"], pretrained=str(bad))
    assert not out.exists()
    for name in ("conventional-dogs-vit-b16-384", "few-shot-cub-5shot", "long-tail-flowers-if10"):
        assert recipes.load(name).weights  # every paper recipe names its backbone's weights
    assert recipes.load("tiny").weights is None


def test_weights_are_described_by_their_fingerprint(tmp_path):
    import hashlib

    from diffmix_ray.classify.model import FROM_SCRATCH, describe_weights

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights")
    w = describe_weights(str(f))
    assert (w["file"], w["sha256"], w["init"]) == (str(f), hashlib.sha256(b"weights").hexdigest(), "pretrained")
    assert describe_weights(FROM_SCRATCH) == {"pretrained": "none", "file": None, "sha256": None,
                                              "init": "random (--pretrained none)"}
    assert describe_weights(None)["init"] == "random (no --pretrained)"
    with pytest.raises(DiffmixError, match="does not exist"):
        describe_weights(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# The reference's CutMix / Mixup / CMO: label arithmetic on soft labels
# ---------------------------------------------------------------------------------------------
def _batch(n=6, size=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.softmax(torch.randn(n, classes, generator=g) * 3, dim=1) * 0.9  # soft labels, scaled as soft_scaler
    return x, y


def test_reference_cutmix_mixes_each_sample_with_another_by_its_pixel_share():
    from diffmix_ray.classify import mixing

    x, y = _batch(n=64, size=16)
    mixed, target = mixing.cutmix(x, y, prob=0.5, generator=torch.Generator().manual_seed(3))
    changed = (mixed != x).flatten(1).any(1)
    assert 10 < int(changed.sum()) < 54  # about half the samples (each its own coin)
    for i in range(len(x)):
        pasted = (mixed[i] != x[i]).any(0)  # the pixels that came from another image
        if not pasted.any():  # not mixed, or a box too thin to hold a pixel: the label is the sample's own
            torch.testing.assert_close(target[i], y[i])
            continue
        share = 1.0 - float(pasted.float().mean())
        # the box's pixels are all one other sample's, and the label mixes in that sample's label
        sources = [j for j in range(len(x)) if j != i and torch.equal(mixed[i][:, pasted], x[j][:, pasted])]
        assert len(sources) == 1, i
        j = sources[0]
        rows, cols = pasted.nonzero(as_tuple=True)
        assert int((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)) == int(pasted.sum())  # a box
        torch.testing.assert_close(target[i], share * y[i] + (1 - share) * y[j], rtol=1e-5, atol=1e-6)
    # mass is conserved: soft labels summing to 0.9 still sum to 0.9 after mixing
    torch.testing.assert_close(target.sum(1), torch.full((64,), 0.9), rtol=1e-5, atol=1e-5)
    same, kept = mixing.cutmix(x, y, prob=0.0)
    assert torch.equal(same, x) and torch.equal(kept, y)


def test_reference_mixup_and_cmo_label_arithmetic():
    from diffmix_ray.classify import mixing

    x, y = _batch(n=8)
    gen = torch.Generator().manual_seed(0)
    mixed, target = mixing.mixup(x, y, prob=1.0, generator=gen)
    # x = lam x + (1 - lam) x[perm]: find the partner and lam from the pixels, then check the labels
    for i in range(len(x)):
        fits = []
        for k in range(len(x)):
            d = x[i] - x[k]
            lam = float(((mixed[i] - x[k]) * d).sum() / (d * d).sum()) if k != i else 1.0
            fits.append((float(((mixed[i] - lam * x[i] - (1 - lam) * x[k]) ** 2).sum()), lam, k))
        resid, lam, j = min(fits)
        assert resid < 1e-8
        torch.testing.assert_close(target[i], lam * y[i] + (1 - lam) * y[j], rtol=1e-4, atol=1e-5)
    x_minor, y_minor = _batch(n=8, seed=5)
    pasted_x, pasted_y = mixing.cmo(x, y, x_minor, y_minor, prob=1.0, generator=torch.Generator().manual_seed(1))
    box = (pasted_x != x).any(1)  # (N, H, W): one box, the same on every image
    assert box.any() and all(torch.equal(box[0], b) for b in box)
    assert torch.equal(pasted_x[:, :, box[0]], x_minor[:, :, box[0]])
    share = 1.0 - float(box[0].float().mean())
    torch.testing.assert_close(pasted_y, share * y + (1 - share) * y_minor)
    assert mixing.cmo(x, y, x_minor, y_minor, prob=0.0)[0] is x


def test_inputs_mix_the_rows_own_soft_labels_then_smooth():
    """Diff-Mix + CutMix as the reference: the synthetic row's soft label (times soft_scaler) is what
    CutMix mixes; label smoothing comes last."""
    from diffmix_ray.classify import mixing, step

    d = {"mean": [0.5] * 3, "std": [0.5] * 3, "img_size": 16}
    batch = {"image": torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8),
             "source": torch.tensor([0, 1]), "label": torch.tensor([0, 3]), "strength": torch.tensor([0.0, 0.64])}
    seen = {}

    def spy(x, y):
        seen["x"], seen["y"] = x.clone(), y.clone()
        return mixing.cutmix(x, y, prob=1.0, generator=torch.Generator().manual_seed(0))

    inputs = step.Inputs(d, "cpu", 4, gamma=0.5, smoothing=0.1, soft_scaler=0.9, mix=spy)
    x, y = inputs(batch, training=True)
    # the real row one-hot, the synthetic row (s = 0.64, gamma 0.5: 0.2 / 0.8) times 0.9
    torch.testing.assert_close(seen["y"], torch.tensor([[1.0, 0, 0, 0], [0, 0.9 * 0.2, 0, 0.9 * 0.8]]))
    want_x, want_y = mixing.cutmix(seen["x"], seen["y"], prob=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, want_x)
    torch.testing.assert_close(y, 0.9 * want_y + 0.1 / 4)  # smoothing last, on the mixed target
    # evaluation neither mixes nor scales a real row
    _, y_eval = inputs(batch, training=False)
    torch.testing.assert_close(y_eval[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))


@pytest.mark.parametrize("kw, msg", [
    (dict(cutmix=True, synthetic=("s",)), "--mixing reference"),
    (dict(mix_prob=0.2), "--mix-prob is the probability of --cutmix/--mixup"),
    (dict(cutmix=True, mixup=True, mixing="reference"), "not both"),
    (dict(cmo=True, cutmix=True), "--cmo pastes minority patches itself"),
    (dict(soft_scaler=0.0), r"--soft-scaler 0.0 .* must be in \(0, 1\]"),
    (dict(mixing="batch"), "--mixing 'batch': choose timm or reference"),
    (dict(drw_epoch=3, loss="ldam"), "--drw-epoch belongs to --loss drw or ldam-drw"),
])
def test_mixing_options_misuse(kw, msg):
    from diffmix_ray.classify.config import ClassifyConfig

    with pytest.raises(DiffmixError, match=msg):
        ClassifyConfig(**(dict(dataset="d", arch="test_resnet", out="o") | kw)).validate()
    ClassifyConfig(dataset="d", arch="test_resnet", out="o", cutmix=True, synthetic=("s",), mixing="reference",
                   mix_prob=0.1).validate()  # Diff-Mix + CutMix: allowed with the reference's semantics


def test_new_options_at_their_defaults_keep_a_runs_identity():
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import LATER_OPTIONS, _config

    plain = _config(ClassifyConfig(dataset="d", arch="a", out="o"))
    assert not set(LATER_OPTIONS) & set(plain)  # runs written before these options resume
    assert _config(ClassifyConfig(dataset="d", arch="a", out="o", soft_scaler=0.9))["soft_scaler"] == 0.9


# ---------------------------------------------------------------------------------------------
# Losses: LDAM, LDAM-DRW
# ---------------------------------------------------------------------------------------------
def test_ldam_is_the_references_loss_on_class_indices():
    import torch.nn.functional as F

    from diffmix_ray.classify.losses import Criterion, drw_weights, ldam_margins

    counts = [40, 10, 3, 1]
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 1, 0])

    def reference(x, target, weight=None):  # downstream_tasks/imb_cls/losses.py LDAMLoss (max_m 0.5, s 30)
        m_list = 1.0 / np.sqrt(np.sqrt(counts))
        m_list = torch.tensor(m_list * (0.5 / np.max(m_list)), dtype=torch.float32)
        index = torch.zeros_like(x, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)
        batch_m = (m_list[None, :] @ index.float().T).view(-1, 1)
        return F.cross_entropy(30 * torch.where(index, x - batch_m, x), target, weight=weight)

    assert ldam_margins(counts).max() == pytest.approx(0.5)
    onehot = F.one_hot(labels, 4).float()
    hard = Criterion("ldam-drw", counts, drw_epoch=2, hard_labels=True)
    torch.testing.assert_close(hard.for_epoch(1)(logits, onehot, labels), reference(logits, labels))
    w = torch.tensor(drw_weights(counts, 0.9999), dtype=torch.float32)
    torch.testing.assert_close(hard.for_epoch(2)(logits, onehot, labels), reference(logits, labels, w))
    # on soft targets without re-weighting, one-hot rows give the same loss
    soft = Criterion("ldam", counts)
    torch.testing.assert_close(soft.for_epoch(5)(logits, onehot, labels), reference(logits, labels))


# ---------------------------------------------------------------------------------------------
# Incomplete last batches; CMO's minority stream
# ---------------------------------------------------------------------------------------------
def test_incomplete_last_batches_are_kept_per_epoch():
    from diffmix_ray.classify import data

    real = data.Rows(np.zeros(10, np.int32), np.arange(10), np.arange(10) % 3, np.arange(10) % 3, np.zeros(10, np.float32))
    empty = real.take(np.arange(0))
    rows, steps = data.run_rows(real, empty, 0.0, None, 0, range(2, 5), 0, 1, 4, drop_last=False)
    assert steps == 3 and len(rows) == 30  # 4 + 4 + 2 per epoch, every image every epoch
    sizes = list(data.epoch_sizes(10, 4, 3))
    assert sizes == [4, 4, 2] * 3
    stream = ({"label": torch.as_tensor(rows.target[i:i + 4]), "image": list(rows.row[i:i + 4]),
               "file": rows.file[i:i + 4]} for i in range(0, 30, 4))  # fixed-size batches across epochs
    batches = list(data.regroup(stream, iter(sizes)))
    assert [len(b["label"]) for b in batches] == sizes
    flat = [int(r) for b in batches for r in b["image"]]
    assert flat == [int(r) for r in rows.row]  # the rows in order, nothing lost or repeated
    for e in range(3):  # each epoch's batches hold that epoch's images: all 10 of them
        assert sorted(flat[10 * e:10 * e + 10]) == list(range(10))
    dropped, steps = data.run_rows(real, empty, 0.0, None, 0, range(2, 5), 0, 1, 4)
    assert steps == 2 and len(dropped) == 24  # the default: whole batches only
    with pytest.raises(RuntimeError, match="ran out"):
        list(data.regroup(iter([{"label": torch.zeros(3)}]), iter([2, 2])))


def test_cmo_minority_stream_draws_classes_evenly_and_is_its_own_stream():
    from diffmix_ray.classify import data
    from diffmix_ray.classify import labels as lab

    counts = [60, 30, 8, 2]
    labels = np.repeat(np.arange(4), counts)
    n = len(labels)
    real = data.Rows(np.zeros(n, np.int32), np.arange(n), labels, labels, np.zeros(n, np.float32))
    empty = real.take(np.arange(0))
    w = lab.minority_weights(labels, counts)
    drawn = np.concatenate([data.epoch_rows(real, empty, 0.0, None, 0, e, 0, 1, real_weights=w).target
                            for e in range(200)])
    share = np.bincount(drawn, minlength=4) / len(drawn)
    np.testing.assert_allclose(share, 0.25, atol=0.01)  # 1/n_c per image: each class a quarter
    main = data.epoch_rows(real, empty, 0.0, None, 0, 0, 0, 1)
    assert sorted(main.row) == list(range(n))  # the main stream is unchanged: a permutation
    with_minority = data.epoch_rows(real, empty, 0.0, None, 0, 0, 0, 1, real_weights=w)
    assert not np.array_equal(with_minority.row, main.row)


# ---------------------------------------------------------------------------------------------
# DA-Fusion's per-class token schedule
# ---------------------------------------------------------------------------------------------
def test_row_adamw_leaves_absent_classes_untouched_and_follows_each_classs_own_adamw():
    """Three class tokens, steps with various classes: a row whose class is absent is bit-identical
    after the step (value and moments); each row ends where a plain torch AdamW run on that row alone,
    stepping only on its class's steps, ends."""
    from diffmix_ray.finetune.token_optim import RowAdamW

    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 8, generator=g)
    rows = torch.nn.Parameter(start.clone())
    opt = RowAdamW([rows], lr=0.1, weight_decay=0.05)
    alone = [torch.nn.Parameter(start[c].clone()) for c in range(3)]
    plain = [torch.optim.AdamW([p], lr=0.1, weight_decay=0.05) for p in alone]
    schedule = [0, 2, 2, 0, 1, 0, 2]
    for step, c in enumerate(schedule):
        grad = torch.randn(3, 8, generator=g)  # every row gets a gradient: only the class's row may move
        before = rows.detach().clone()
        moments = {k: v.clone() for k, v in opt.state[rows].items()} if opt.state[rows] else None
        rows.grad = grad.clone()
        opt.set_rows(torch.tensor([c, c]))
        opt.step()
        others = [k for k in range(3) if k != c]
        assert torch.equal(rows.detach()[others], before[others]), step
        assert not torch.equal(rows.detach()[c], before[c])
        if moments:
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[rows][k][others], moments[k][others])
        alone[c].grad = grad[c].clone()
        plain[c].step()
    for c in range(3):
        torch.testing.assert_close(rows.detach()[c], alone[c].detach(), rtol=1e-5, atol=1e-6)
    assert opt.state[rows]["step"].tolist() == [3.0, 1.0, 3.0]
    with pytest.raises(RuntimeError, match="set_rows"):
        opt.step()  # a stale mask is never reused


def test_per_class_sampler_gives_each_step_one_class_and_each_class_its_steps():
    from diffmix_ray.finetune.sampling import PerClassSampler

    labels = np.repeat(np.arange(5), [7, 1, 3, 12, 2])
    s = PerClassSampler(labels, 5, seed=0, batch_size=2, world=2)
    steps = range(1, 5 * 6 + 1)  # six rounds
    per_step = [np.concatenate([s.indices(t, r) for r in range(2)]) for t in steps]
    classes = [set(labels[i]) for i in per_step]
    assert all(len(c) == 1 for c in classes)  # every global batch one class
    assert np.bincount([c.pop() for c in classes], minlength=5).tolist() == [6] * 5
    # a class's images come in permutations of its own: over its 6 steps (24 images) class 0's 7 each 3-4 times
    zero = np.concatenate([i for i in per_step if labels[i[0]] == 0])
    assert set(np.bincount(zero, minlength=7)[:7]) <= {3, 4}
    again = PerClassSampler(labels, 5, seed=0, batch_size=2, world=2)
    assert all(np.array_equal(again.indices(t, 1), s.indices(t, 1)) for t in (30, 3, 17))  # any order, same rows


def test_per_class_schedule_needs_ti_and_keeps_joint_runs_identity():
    from diffmix_ray.finetune.config import FinetuneConfig

    with pytest.raises(DiffmixError, match="--mode ti, or token_schedule joint"):
        FinetuneConfig(dataset="d", out="o", token_schedule="per-class").validate()
    with pytest.raises(DiffmixError, match="drop --class-balanced"):
        FinetuneConfig(dataset="d", out="o", mode="ti", token_schedule="per-class", class_balanced=True).validate()
    assert "token_schedule" not in FinetuneConfig(dataset="d", out="o").identity()
    assert FinetuneConfig(dataset="d", out="o", mode="ti", token_schedule="per-class").identity()["token_schedule"] \
        == "per-class"


# ---------------------------------------------------------------------------------------------
# Recipes: what the paper-era code ran, and what `recipe show` states
# ---------------------------------------------------------------------------------------------
def test_recipes_follow_the_paper_era_settings():
    from diffmix_ray.orchestrate import recipes

    five = recipes.load("few-shot-cub-5shot")  # run.sh 5shot_results: R50 @448, lr 0.025, batch 64, 120 epochs
    cls = five.methods["diff-mix"].train_cls
    assert (cls["res_mode"], cls["lr"], cls["batch_size"], cls["epochs"]) == (448, 0.025, 64, 120)
    cur = recipes.load("few-shot-cub-1shot-r224")  # the current reference: 224 px, lr 0.05, batch min(256, N)
    cls = cur.methods["diff-mix"].train_cls
    assert (cls["res_mode"], cls["lr"], cls["batch_size"]) == (224, 0.05, 200)
    assert recipes.load("few-shot-cub-10shot-r224").methods["real-only"].train_cls["batch_size"] == 256
    cub = recipes.load("conventional-cub-resnet50-448")
    assert {"diff-mix+cutmix"} <= set(cub.rows)
    cut, both = cub.methods["cutmix"].train_cls, cub.methods["diff-mix+cutmix"].train_cls
    assert (cut["mixing"], cut["weight_decay"], cut["mix_prob"]) == ("reference", 1e-4, 0.1)
    assert (both["mixing"], both["weight_decay"], both["mix_prob"]) == ("reference", 1e-4, 0.1)
    assert cub.methods["diff-mix+cutmix"].synthetic == ("diff-mix",)
    lt = recipes.load("long-tail-flowers-if100")
    assert lt.generations["diff-mix"].generate["multiplier"] == 10  # imb_script.sh sample_imbalance
    assert lt.methods["diff-mix"].train_cls["soft_scaler"] == 0.9  # FlowersImbalanceDataset's default
    assert recipes.load("long-tail-cub-if100").methods["diff-mix"].train_cls.get("soft_scaler", 1.0) == 1.0
    assert lt.methods["real-only"].train_cls["drop_last"] is False
    assert {"cmo", "cmo+diff-mix", "ldam-drw", "ldam-drw+diff-mix"} <= set(lt.rows)
    assert lt.methods["cmo"].train_cls["cmo"] and lt.methods["ldam-drw"].train_cls["loss"] == "ldam-drw"
    daf = cub.banks["da-fusion"].config("d", "o", "sd15", num_classes=200)
    assert daf.token_schedule == "per-class" and daf.max_steps == 4000 * 200 // 8


def test_recipe_show_states_weights_protocol_and_what_it_follows():
    res = CliRunner().invoke(app, ["recipe", "show", "few-shot-cub-5shot"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert "# weights: torchvision ResNet-50 IMAGENET1K_V1" in text
    assert ("classifier: resnet50, reference pipeline at res mode 448, batch 64 x 1 worker(s), lr 0.025 (sgd, weight "
            "decay 0.0005, cosine schedule), 120 epochs, reported: the final epoch") in text
    assert "follows: " in text and "4aa0ec8" in text and "main_cls_fewshot" in text
    conv = _flat(CliRunner().invoke(app, ["recipe", "show", "conventional-cub-vit-b16-384"],
                                    env={"COLUMNS": "250"}).output)
    assert "IMAGENET1K_SWAG_E2E_V1" in conv and "row cutmix: weight_decay 0.0001" in conv


def test_the_table_header_says_which_epoch_it_reports():
    from diffmix_ray.orchestrate.table import Row, table_rows

    def metrics(select):
        return {"summary": {"test_top1": 0.5, "select": select}}

    assert table_rows([Row("real-only", "Real only", [1], [metrics("last")])])[0][1] == "Top-1 (%, last epoch)"
    assert table_rows([Row("real-only", "Real only", [1], [metrics("val")])])[0][1] == "Top-1 (%, val-selected epoch)"
    mixed = [Row("real-only", "R", [1], [metrics("val")]), Row("diff-mix", "D", [1], [metrics("last")])]
    assert table_rows(mixed)[0][1] == "Top-1 (%, last epoch / val-selected epoch)"


def test_report_names_the_backbone_weights():
    from diffmix_ray.orchestrate.table import Row, _weights_lines

    w = {"file": "/w/r50.safetensors", "sha256": "ab" * 32, "init": "pretrained"}
    rows = [Row("real-only", "Real only", [1, 2], [{"weights": w}, {"weights": w}])]
    assert _weights_lines(rows) == [f"Backbone weights: /w/r50.safetensors (sha256 {'ab' * 8})"]
    rows.append(Row("diff-mix", "Diff-Mix", [1], [{"weights": {"init": "random (--pretrained none)"}}]))
    assert _weights_lines(rows)[1] == "Backbone weights: random (--pretrained none) (Diff-Mix)"
    assert json.dumps(_weights_lines(rows))  # plain strings


def test_mixing_from_config_picks_timm_or_the_reference():
    from timm.data import Mixup

    from diffmix_ray.classify import mixing

    base = {"cutmix": True, "mixup": False, "label_smoothing": 0.1, "num_classes": 4}
    timm_mix, ref = mixing.from_config(**base | {"mixing": "timm", "mix_prob": None})
    assert isinstance(timm_mix, Mixup) and ref is None and timm_mix.mix_prob == 0.5 and timm_mix.cutmix_alpha == 1.0
    none, ref = mixing.from_config(**base | {"mixing": "reference", "mix_prob": 1.0})
    x, y = _batch(n=4)
    torch.manual_seed(0)
    got = ref(x, y)
    torch.manual_seed(0)
    want = mixing.cutmix(x, y, 1.0)
    assert none is None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert mixing.from_config(**base | {"cutmix": False, "mixing": "reference"}) == (None, None)
