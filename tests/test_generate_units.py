"""generate without Ray: planning, the translation UDF (batch invariance, failures), the concept
bank checks and config validation."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from diffmix_ray import canonical
from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
from diffmix_ray.errors import DiffmixError
from diffmix_ray.generate.config import GenerateConfig
from diffmix_ray.generate.plan import inverse_frequency_weights, make_plan
from diffmix_ray.generate.run import resolve_inputs
from diffmix_ray.generate.translate import COL_ERROR, COL_SOURCE_IMAGE, Translator

IDS = [f"img{i:03d}" for i in range(40)]
LABELS = [i % 4 for i in range(40)]


def plan(**kw):
    cfg = GenerateConfig(dataset="d", **({"mode": "real-mix"} | kw))
    return make_plan(IDS, LABELS, 4, cfg).to_pydict()


def test_plan_is_deterministic_and_ids_unique():
    a, b = plan(seed=3), plan(seed=3)
    assert a == b
    assert len(set(a["pair_id"])) == len(a["pair_id"]) == 200  # multiplier 5 x 40 train images
    assert len(set(a["seed"])) == 200
    assert plan(seed=4)["target_label"] != a["target_label"]
    # the plan does not depend on the order the dataset lists its images in
    cfg = GenerateConfig(dataset="d", mode="real-mix", seed=3)
    assert make_plan(IDS[::-1], LABELS[::-1], 4, cfg).to_pydict() == a


def test_plan_modes():
    mix = plan(mode="real-mix")
    assert all(s != t for s, t in zip(mix["source_label"], mix["target_label"]))
    aug = plan(mode="real-aug")
    assert aug["source_label"] == aug["target_label"]
    gen = plan(mode="real-gen")
    assert set(gen["strength"]) == {1.0} and set(gen["source_id"]) == {None}
    daf = GenerateConfig(dataset="d", mode="da-fusion", concepts="bank", multiplier=None, per_image=3)
    p = make_plan(IDS, LABELS, 4, daf).to_pydict()
    assert Counter(p["source_id"]) == {i: 3 for i in IDS}
    assert set(p["strength"]) <= {0.25, 0.5, 0.75, 1.0} and p["source_label"] == p["target_label"]


def test_plan_volume_and_source_sampling():
    assert len(plan(multiplier=2.5)["pair_id"]) == 100
    per = plan(multiplier=None, per_image=2)
    assert Counter(per["source_id"]) == {i: 2 for i in IDS}
    even = plan(multiplier=2, source_sampling="per-image")
    assert set(Counter(even["source_id"]).values()) == {2}
    assert len(plan(limit=7)["pair_id"]) == 7


def test_plan_strength_options():
    assert np.allclose(plan(strength=0.3)["strength"], 0.3)
    assert set(np.round(plan(strength_set=(0.3, 0.5, 0.7, 0.9))["strength"], 2)) == {0.3, 0.5, 0.7, 0.9}
    beta = np.asarray(plan(strength_beta=(5.0, 5.0))["strength"])
    assert beta.min() >= 0.1 - 1e-6 and beta.max() <= 0.9 + 1e-6 and len(set(beta.round(2))) > 3


def test_inverse_frequency_targets_favour_rare_classes():
    labels = [0] * 30 + [1] * 6 + [2] * 3 + [3] * 1
    ids = [f"i{k}" for k in range(40)]
    cfg = GenerateConfig(dataset="d", mode="real-gen", target_sampling="inverse-frequency", multiplier=100)
    counts = Counter(make_plan(ids, labels, 4, cfg).column("target_label").to_pylist())
    w = inverse_frequency_weights([30, 6, 3, 1])
    assert np.allclose(w, np.array([1 / 31, 1 / 7, 1 / 4, 1 / 2]) / sum([1 / 31, 1 / 7, 1 / 4, 1 / 2]))
    for c in range(4):
        assert abs(counts[c] / 4000 - w[c]) < 0.03


@pytest.mark.parametrize("kw, msg", [
    (dict(strength=0.0), r"outside \(0, 1\]"),
    (dict(strength=1.5), r"outside \(0, 1\]"),
    (dict(strength_set=(0.5, 1.2)), r"outside \(0, 1\]"),
    (dict(multiplier=0), "must be > 0"),
    (dict(multiplier=-2), "must be > 0"),
    (dict(mode="mixup"), "--mode 'mixup' is unknown"),
    (dict(mode="diff-mix"), "pass --concepts"),
    (dict(min_actors=3, max_actors=2), "--min-actors"),
])
def test_config_validation(kw, msg):
    with pytest.raises(DiffmixError, match=msg):
        GenerateConfig(dataset="d", **({"mode": "real-mix"} | kw)).validate()


def _batch(dataset_uri: str, targets: list[int], strengths: list[float], seeds: list[int]) -> dict:
    train = canonical.open_dataset(dataset_uri).read_split("train")
    n = len(targets)
    return {
        "pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
        "source_id": np.array(train.column(COL_IMAGE_ID).to_pylist()[:n], dtype=object),
        "source_label": np.array(train.column(COL_LABEL).to_pylist()[:n], dtype=np.int32),
        "target_label": np.array(targets, dtype=np.int32),
        "strength": np.array(strengths, dtype=np.float32),
        "seed": np.array(seeds, dtype=np.int64),
        "mode": np.array(["diff-mix"] * n, dtype=object),
        COL_SOURCE_IMAGE: np.array(train.column(COL_IMAGE).to_pylist()[:n], dtype=object),
    }


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def translator(sample_dataset, tiny_bank):
    info = canonical.open_dataset(sample_dataset).info
    return Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2)


def test_mixed_batch_equals_each_pair_alone(translator, sample_dataset):
    """The reference's bug: one target and one strength per batch. Here a batch of pairs with
    different targets, strengths and seeds gives, pair by pair, the image of that pair alone."""
    batch = _batch(sample_dataset, targets=[1, 2, 3, 0, 2], strengths=[0.7, 0.3, 0.7, 0.9, 0.5],
                   seeds=[11, 22, 33, 44, 55])
    together = translator(batch)
    assert list(together[COL_ERROR]) == [""] * 5
    for i in range(5):
        alone = translator({k: v[i:i + 1] for k, v in batch.items()})
        assert alone["prompt"][0] == together["prompt"][i]
        diff = np.abs(_pixels(alone[COL_IMAGE][0]) - _pixels(together[COL_IMAGE][i]))
        # Float outputs agree to ~1e-4 (batched matmuls round differently); after uint8 rounding
        # ~0.5% of pixels move by one level, which JPEG spreads over their 8x8 blocks.
        assert diff.mean() < 1.0 and diff.max() <= 16, f"pair {i}: mean {diff.mean():.3f} max {diff.max()}"
    # and the pairs really differ from one another (targets/strengths/seeds matter)
    assert np.abs(_pixels(together[COL_IMAGE][0]) - _pixels(together[COL_IMAGE][2])).mean() > 5


def test_batched_floats_equal_single_pair_floats(translator, sample_dataset):
    from diffmix_ray.images import decode_rgb

    batch = _batch(sample_dataset, targets=[1, 2, 3], strengths=[0.6] * 3, seeds=[9, 8, 7])
    images = [decode_rgb(b) for b in batch[COL_SOURCE_IMAGE]]
    prompts = [translator.prompt(int(t)) for t in batch["target_label"]]
    together = translator._run(prompts, [9, 8, 7], 0.6, images)
    for i in range(3):
        alone = translator._run(prompts[i:i + 1], [[9, 8, 7][i]], 0.6, images[i:i + 1])
        assert np.allclose(alone[0], together[i], atol=1e-3)


def test_bank_tokens_condition_generation(translator, sample_dataset):
    batch = _batch(sample_dataset, targets=[1, 2], strengths=[0.9, 0.9], seeds=[7, 7])
    batch = {k: np.concatenate([v[:1], v[:1]]) if k != "target_label" else v for k, v in batch.items()}
    out = translator(batch)  # same source and seed, two different class tokens
    assert out["prompt"][0] == "a photo of a <class_1> shape" and out["prompt"][1] == "a photo of a <class_2> shape"
    assert np.abs(_pixels(out[COL_IMAGE][0]) - _pixels(out[COL_IMAGE][1])).mean() > 5


def test_bank_changes_output_vs_base_model(translator, sample_dataset):
    info = canonical.open_dataset(sample_dataset).info
    base = Translator("tiny", "mix", info.classes, info.super_class, steps=6, threads=2,
                      prompt_template="a photo of a <class_1> shape")  # same prompt text, no bank
    batch = _batch(sample_dataset, targets=[1], strengths=[0.9], seeds=[5])
    assert np.abs(_pixels(base(batch)[COL_IMAGE][0]) - _pixels(translator(batch)[COL_IMAGE][0])).mean() > 5


def test_bad_source_and_nan_output_are_counted_not_fatal(translator, sample_dataset, monkeypatch):
    batch = _batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7] * 3, seeds=[1, 2, 3])
    batch[COL_SOURCE_IMAGE][1] = b"\xff\xd8 definitely not a jpeg"
    out = translator(batch)
    assert out[COL_ERROR][0] == "" and out[COL_ERROR][2] == ""
    assert out[COL_ERROR][1].startswith("source image failed to decode")
    real_run = translator._run

    def poisoned(prompts, seeds, strength, images):
        arr = real_run(prompts, seeds, strength, images)
        arr[0, 0, 0, 0] = np.nan  # as an fp16 overflow would
        arr[-1] = 0.0  # and a black image
        return arr

    monkeypatch.setattr(translator, "_run", poisoned)
    out = translator(_batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7] * 3, seeds=[1, 2, 3]))
    assert "NaN" in out[COL_ERROR][0] and out[COL_ERROR][1] == "" and "black" in out[COL_ERROR][2]


def test_bank_for_another_dataset_or_model_is_refused(sample_dataset, tiny_bank, tmp_path):
    from .fixtures import make_imagefolder, make_random_bank
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    other = str(tmp_path / "other")
    prepare(PrepareConfig("imagefolder", make_imagefolder(str(tmp_path / "raw"), {"a": 4, "b": 4, "c": 4, "d": 4}),
                          super_class="x"), other, show_progress=False)
    with pytest.raises(DiffmixError, match="trained on another dataset"):
        resolve_inputs(GenerateConfig(dataset=other, concepts=tiny_bank, out=str(tmp_path / "o")))
    with pytest.raises(DiffmixError, match="trained on base model 'tiny'"):
        resolve_inputs(GenerateConfig(dataset=sample_dataset, model="tiny:1", concepts=tiny_bank, out=str(tmp_path / "o")))
    # a bank with tokens for fewer classes than the dataset has
    small = make_random_bank(str(tmp_path / "bank3"), "tiny", sample_dataset)
    import json, os
    meta = json.load(open(os.path.join(small, "concepts.json")))
    meta["tokens"] = meta["tokens"][:3]
    json.dump(meta, open(os.path.join(small, "concepts.json"), "w"))
    with pytest.raises(DiffmixError, match="tokens for 3 classes but the dataset has 4"):
        resolve_inputs(GenerateConfig(dataset=sample_dataset, concepts=small, out=str(tmp_path / "o")))


def test_empty_train_split_is_refused(tmp_path):
    import json, os
    from .fixtures import make_imagefolder
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    out = str(tmp_path / "ds")
    prepare(PrepareConfig("imagefolder", make_imagefolder(str(tmp_path / "raw"), {"a": 3}), super_class="x"), out)
    meta = json.load(open(os.path.join(out, "dataset.json")))
    meta["counts"]["train"] = {}
    json.dump(meta, open(os.path.join(out, "dataset.json"), "w"))
    with pytest.raises(DiffmixError, match="train split .* is empty"):
        resolve_inputs(GenerateConfig(dataset=out, mode="real-mix", out=str(tmp_path / "o")))
