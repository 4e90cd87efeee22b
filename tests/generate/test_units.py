"""generate without Ray: planning, the translation UDF (batch invariance, failures), the concept
bank checks and config validation."""

from __future__ import annotations

import io
import threading
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from diffmix_ray import canonical
from diffmix_ray.contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL
from diffmix_ray.errors import DiffmixError
from diffmix_ray.generate.config import GenerateConfig
from diffmix_ray.generate.cpu_stages import COL_ERROR, COL_PIXELS, decode_sources
from diffmix_ray.generate.plan import denoising_steps, inverse_frequency_weights, make_plan
from diffmix_ray.generate.run import resolve_inputs
from diffmix_ray.generate.translate import Translator

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


def test_long_tailed_datasets_default_to_sources_from_the_long_tail(sample_dataset, tmp_path, warnings_seen):
    """On a long-tailed dataset the sources follow its image distribution (per-image), as the paper's
    long-tail generation; elsewhere the reference's class-uniform draw. An explicit option wins, and
    each choice is said with its reason."""
    from diffmix_ray.data.prepare import DeriveConfig, derive

    lt = str(tmp_path / "lt")
    derive(DeriveConfig(parent=sample_dataset, imbalance_ratio=3), lt)
    warnings_seen.clear()  # the parent's carved val, said by derive: not this test's subject
    inputs = resolve_inputs(GenerateConfig(dataset=lt, mode="real-mix", out=str(tmp_path / "o")))
    assert inputs.cfg.source_sampling == inputs.identity["source_sampling"] == "per-image"
    assert "default for long-tailed datasets (imbalance ratio 3)" in inputs.resolved["source_sampling"]["from"]
    assert "∝ 1/(n_c + 1)" in inputs.resolved["target_sampling"]["from"]
    info = canonical.open_dataset(lt).info
    sources = Counter(make_plan(*zip(*[(f"i{k}", c) for c, n in enumerate(info.class_counts("train"))
                                       for k in range(n)]), 4, inputs.cfg).column("source_label").to_pylist())
    assert [sources[c] for c in range(4)] == [5 * n for n in info.class_counts("train")]  # the long tail's shape
    spelled = resolve_inputs(GenerateConfig(dataset=lt, mode="real-mix", source_sampling="per-image"))
    assert spelled.identity == inputs.identity
    explicit = resolve_inputs(GenerateConfig(dataset=lt, mode="real-mix", source_sampling="class-uniform"))
    assert explicit.cfg.source_sampling == "class-uniform"
    assert explicit.resolved["source_sampling"]["from"] == "--source-sampling"
    balanced = resolve_inputs(GenerateConfig(dataset=sample_dataset, mode="real-mix"))
    assert balanced.cfg.source_sampling == "class-uniform" and not warnings_seen
    resolve_inputs(GenerateConfig(dataset=sample_dataset, mode="real-mix", target_sampling="inverse-frequency"))
    assert any("inverse-frequency on" in w and "drawn uniformly" in w for w in warnings_seen)


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


def _batch(dataset_uri: str, targets: list[int], strengths: list[float], seeds: list[int], resolution: int = 64,
           sources: list[bytes] | None = None) -> dict:
    """What the stage before translation hands the actor: plan columns + decoded, resized pixels."""
    train = canonical.open_dataset(dataset_uri).read_split("train")
    n = len(targets)
    plan = {
        "pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
        "source_id": np.array(train.column(COL_IMAGE_ID).to_pylist()[:n], dtype=object),
        "source_label": np.array(train.column(COL_LABEL).to_pylist()[:n], dtype=np.int32),
        "target_label": np.array(targets, dtype=np.int32),
        "strength": np.array(strengths, dtype=np.float32),
        "seed": np.array(seeds, dtype=np.int64),
        "mode": np.array(["diff-mix"] * n, dtype=object),
    }
    return decode_sources(plan, sources or train.column(COL_IMAGE).to_pylist()[:n], resolution)


def _one(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.fixture(scope="module")
def translator(sample_dataset, tiny_bank):
    info = canonical.open_dataset(sample_dataset).info
    return Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2)


def test_mixed_batch_equals_each_pair_alone(translator, sample_dataset):
    """The reference's bug: one target and one strength per batch. Here a batch of pairs with
    different targets, strengths and seeds gives, pair by pair, the image of that pair alone
    (with a concept bank: fused LoRA, class tokens)."""
    batch = _batch(sample_dataset, targets=[1, 2, 3, 0, 2], strengths=[0.7, 0.3, 0.7, 0.9, 0.5],
                   seeds=[11, 22, 33, 44, 55])
    together = translator(batch)
    assert list(together[COL_ERROR]) == [""] * 5
    for i in range(5):
        alone = translator(_one(batch, i))
        assert alone["prompt"][0] == together["prompt"][i]
        # Floats agree to ~1e-4 (batched matmuls round differently): at most one uint8 level.
        assert _diff(alone[COL_PIXELS][0], together[COL_PIXELS][i]).max() <= 1, f"pair {i}"
    # and the pairs really differ from one another (targets/strengths/seeds matter)
    assert _diff(together[COL_PIXELS][0], together[COL_PIXELS][2]).mean() > 5


def test_hot_path_equals_plain_diffusers(translator, sample_dataset, tiny_bank):
    """Fused LoRA, prompt embeddings computed once, one VAE encode per batch and uint8 on the
    device give the images plain diffusers gives pair by pair: the bank loaded unfused, PIL
    input, the prompt as text, a per-image encode inside the pipeline."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from diffmix_ray.images import decode_rgb
    from diffmix_ray.models import concepts as bank_io
    from diffmix_ray.models.loader import load_pipeline

    pipe, _ = load_pipeline("tiny")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    bank, local = bank_io.load_bank(tiny_bank)
    bank_io.apply_bank(pipe, bank, local)
    strengths, seeds, targets = [0.7, 0.35, 0.9], [3, 4, 5], [2, 3, 1]
    batch = _batch(sample_dataset, targets=targets, strengths=strengths, seeds=seeds)
    ours = translator(batch)[COL_PIXELS]
    train = canonical.open_dataset(sample_dataset).read_split("train")
    for i, data in enumerate(train.column(COL_IMAGE).to_pylist()[:3]):
        source = decode_rgb(data).resize((64, 64), Image.BILINEAR)
        with torch.inference_mode():
            ref = pipe(prompt=[bank.prompt(targets[i])], image=[source], strength=strengths[i], num_inference_steps=6,
                       guidance_scale=7.5, generator=[torch.Generator().manual_seed(seeds[i])],
                       output_type="np").images[0]
        assert _diff(np.round(ref * 255).astype(np.uint8), ours[i]).max() <= 1, f"pair {i}"


def test_cpu_streams_run_at_once_and_give_the_images_of_one_team(translator, sample_dataset, tiny_bank,
                                                                  monkeypatch):
    """On a CPU an actor with 2 threads runs its device batches on 2 single-threaded streams at
    once (each with its own scheduler); the images are those one OpenMP team of 2 gives in turn."""
    info = canonical.open_dataset(sample_dataset).info
    team = Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2,
                      batch_size=2, streams=1)
    batch = _batch(sample_dataset, targets=[1, 2, 3, 0, 2], strengths=[0.7, 0.7, 0.7, 0.3, 0.9],
                   seeds=[1, 2, 3, 4, 5])
    both_in = threading.Barrier(2, timeout=60)  # broken (and the call fails) unless 2 batches overlap
    entered: list[int] = []
    real = translator.translate

    def meeting(pixels, labels, seeds, n_steps):
        entered.append(threading.get_ident())
        if len(entered) <= 2:
            both_in.wait()
        return real(pixels, labels, seeds, n_steps)

    monkeypatch.setattr(translator, "batch_size", 2)
    monkeypatch.setattr(translator, "translate", meeting)
    streamed = translator(batch)
    assert len(entered) == 4 and len(set(entered[:2])) == 2  # 0.7: batches of 2 and 1; 0.3; 0.9
    assert list(streamed[COL_ERROR]) == [""] * 5
    assert _diff(streamed[COL_PIXELS], team(batch)[COL_PIXELS]).max() <= 1
    sizes = []
    monkeypatch.setattr(translator, "translate", lambda pixels, labels, *a: sizes.append(len(labels)) or
                        real(pixels, labels, *a))
    monkeypatch.setattr(translator, "batch_size", 4)
    translator({k: v[:4] for k, v in batch.items()})  # 3 pairs at 0.7, 1 at 0.3
    assert sorted(sizes) == [1, 1, 2]  # one batch of 4 would have left a stream idle: batches of 2 at most


def test_cpu_streams_text_to_image_each_with_its_own_pipeline(sample_dataset, tiny_bank):
    """diff-gen on 2 CPU streams: each stream's text-to-image pipeline has its own scheduler, and
    the images are those of one OpenMP team."""
    info = canonical.open_dataset(sample_dataset).info
    kw = dict(concepts=tiny_bank, steps=4, threads=2, batch_size=2)
    streamed = Translator("tiny", "gen", info.classes, info.super_class, **kw)
    team = Translator("tiny", "gen", info.classes, info.super_class, streams=1, **kw)
    batch = {"pair_id": np.array(["a", "b", "c", "d"], dtype=object), "target_label": np.array([0, 1, 2, 3]),
             "seed": np.array([7, 8, 9, 10])}
    out = streamed(batch)
    assert list(out[COL_ERROR]) == [""] * 4 and out[COL_PIXELS].shape == (4, 64, 64, 3)
    assert _diff(out[COL_PIXELS], team(batch)[COL_PIXELS]).max() <= 1
    assert streamed._shells.__dict__ == {}  # the shells belong to the stream threads, not to this one


def test_fused_and_unfused_lora_agree(translator, sample_dataset, tiny_bank):
    info = canonical.open_dataset(sample_dataset).info
    unfused = Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2,
                         fuse_lora=False)
    batch = _batch(sample_dataset, targets=[1, 2], strengths=[0.9, 0.6], seeds=[1, 2])
    assert _diff(unfused(batch)[COL_PIXELS], translator(batch)[COL_PIXELS]).max() <= 1


def test_every_pair_runs_exactly_its_denoising_steps(translator, sample_dataset, monkeypatch):
    """s = 0.04, 0.08, ..., 0.96 at 25 steps runs 1, 2, ..., 24 steps. Stored as float32, 14 of
    them (0.12 = 0.11999999731...) lost a step to diffusers' int(steps x s)."""
    strengths = [round(0.04 * k, 2) for k in range(1, 25)]
    assert int(25 * float(np.float32(0.12))) == 2  # the bug the plan's float32 column invites
    calls: dict[int, int] = {}  # thread -> UNet calls of the translate running on it (streams run at once)
    unet = translator.pipe.unet
    hook = unet.register_forward_hook(lambda *_: calls.__setitem__(threading.get_ident(), calls[threading.get_ident()] + 1))
    real = translator.translate

    def counting(pixels, labels, seeds, n_steps):
        calls[threading.get_ident()] = 0
        result = real(pixels, labels, seeds, n_steps)
        ran.append((n_steps, calls[threading.get_ident()], len(labels)))
        return result

    ran: list[tuple[int, int, int]] = []
    monkeypatch.setattr(translator, "steps", 25)
    monkeypatch.setattr(translator, "translate", counting)
    try:
        out = translator(_batch(sample_dataset, targets=[1] * 24, strengths=strengths, seeds=list(range(24)),
                                sources=[canonical.open_dataset(sample_dataset).read_split("train")
                                         .column(COL_IMAGE).to_pylist()[0]] * 24))
    finally:
        hook.remove()
    assert list(out[COL_ERROR]) == [""] * 24
    assert sorted(ran) == [(k, k, 1) for k in range(1, 25)]  # one UNet call (CFG batched) per step, one pair each
    assert [denoising_steps(np.float32(s), 25) for s in strengths] == list(range(1, 25))
    assert denoising_steps(np.float32(0.7), 25) == 17  # diffusers' int(25 x 0.7) for the paper's default


def test_bf16_weights_on_cpu(sample_dataset, tiny_bank, translator):
    """Reduced precision on the CPU, so a dtype mismatch anywhere on the hot path (uint8 -> model
    dtype, embeddings, noise, decode -> uint8) fails here and not first on a rented GPU."""
    info = canonical.open_dataset(sample_dataset).info
    bf16 = Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2,
                      dtype="bfloat16")
    assert bf16.pipe.unet.dtype == torch_dtype("bfloat16")
    batch = _batch(sample_dataset, targets=[1, 2], strengths=[0.7, 0.7], seeds=[1, 2])
    out = bf16(batch)
    assert list(out[COL_ERROR]) == ["", ""]
    assert _diff(out[COL_PIXELS], translator(batch)[COL_PIXELS]).mean() < 12  # bf16 keeps ~3 digits


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def test_bank_tokens_condition_generation(translator, sample_dataset):
    batch = _batch(sample_dataset, targets=[1, 2], strengths=[0.9, 0.9], seeds=[7, 7])
    batch = {k: np.concatenate([v[:1], v[:1]]) if k != "target_label" else v for k, v in batch.items()}
    out = translator(batch)  # same source and seed, two different class tokens
    assert out["prompt"][0] == "a photo of a <class_1> shape" and out["prompt"][1] == "a photo of a <class_2> shape"
    assert _diff(out[COL_PIXELS][0], out[COL_PIXELS][1]).mean() > 5


def test_bank_changes_output_vs_base_model(translator, sample_dataset):
    info = canonical.open_dataset(sample_dataset).info
    base = Translator("tiny", "mix", info.classes, info.super_class, steps=6, threads=2,
                      prompt_template="a photo of a <class_1> shape")  # same prompt text, no bank
    batch = _batch(sample_dataset, targets=[1], strengths=[0.9], seeds=[5])
    assert _diff(base(batch)[COL_PIXELS][0], translator(batch)[COL_PIXELS][0]).mean() > 5


def test_bad_source_and_nan_output_are_counted_not_fatal(translator, sample_dataset, monkeypatch):
    train = canonical.open_dataset(sample_dataset).read_split("train")
    sources = train.column(COL_IMAGE).to_pylist()[:3]
    sources[1] = b"\xff\xd8 definitely not a jpeg"
    batch = _batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7] * 3, seeds=[1, 2, 3], sources=sources)
    assert batch[COL_ERROR][1].startswith("source image failed to decode")
    out = translator(batch)
    assert out[COL_ERROR][0] == "" and out[COL_ERROR][2] == ""
    assert out[COL_ERROR][1].startswith("source image failed to decode")
    real = translator.translate

    def poisoned(pixels, labels, seeds, n_steps):  # by seed: the pairs may run in any device batches
        images, finite, black = real(pixels, labels, seeds, n_steps)
        finite &= np.array([s != 1 for s in seeds])  # as an fp16 overflow would
        black |= np.array([s == 3 for s in seeds])  # and a black image
        return images, finite, black

    monkeypatch.setattr(translator, "translate", poisoned)
    out = translator(_batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7] * 3, seeds=[1, 2, 3]))
    assert "NaN" in out[COL_ERROR][0] and out[COL_ERROR][1] == "" and "black" in out[COL_ERROR][2]


def test_black_and_nan_detection_on_the_device(translator, sample_dataset, monkeypatch):
    """The checks themselves: a decoded image of NaNs and an all -1 image are flagged."""
    vae = translator.pipe.vae
    real_decode = vae.decode

    def decode(latents, *a, **kw):
        out = real_decode(latents, *a, **kw)
        out.sample[0] = float("nan")
        out.sample[1] = -1.0
        return out

    monkeypatch.setattr(vae, "decode", decode)
    batch = _batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7] * 3, seeds=[1, 2, 3])
    _, finite, black = translator.translate(batch[COL_PIXELS], [1, 2, 3], [1, 2, 3], n_steps=4)  # one device batch
    assert list(finite) == [False, True, True] and list(black) == [False, True, False]


def test_bank_for_another_dataset_or_model_is_refused(sample_dataset, tiny_bank, tmp_path):
    from tests.fixtures import make_imagefolder, make_random_bank
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
    from tests.fixtures import make_imagefolder
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    out = str(tmp_path / "ds")
    prepare(PrepareConfig("imagefolder", make_imagefolder(str(tmp_path / "raw"), {"a": 3}), super_class="x"), out)
    meta = json.load(open(os.path.join(out, "dataset.json")))
    meta["counts"]["train"] = {}
    json.dump(meta, open(os.path.join(out, "dataset.json"), "w"))
    with pytest.raises(DiffmixError, match="train split .* is empty"):
        resolve_inputs(GenerateConfig(dataset=out, mode="real-mix", out=str(tmp_path / "o")))


# ---------------------------------------------------------------------------------------------
# The CPU stages around the actor, block sizing and the GPU default
# ---------------------------------------------------------------------------------------------
def test_prepare_sources_reads_decodes_and_chunks(sample_dataset):
    import pyarrow as pa

    from diffmix_ray.generate.cpu_stages import COL_FILE, COL_ROW, COL_SOURCE_H, COL_SOURCE_W, prepare_sources
    from diffmix_ray.images import decode_rgb

    ds = canonical.open_dataset(sample_dataset)
    files = ds.files("train")
    train = ds.read_split("train")
    plan_rows = make_plan(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_LABEL).to_pylist(), 4,
                          GenerateConfig(dataset="d", mode="real-mix", limit=7))
    # locate each source as the stage does
    at_file, at_row = ds.locate("train", plan_rows.column("source_id").to_pylist())
    table = plan_rows.append_column(COL_FILE, pa.array(at_file)).append_column(COL_ROW, pa.array(at_row))
    chunks = list(prepare_sources(table, files, resolution=64, chunk_rows=3))
    assert [len(c["pair_id"]) for c in chunks] == [3, 3, 1]
    assert COL_FILE not in chunks[0] and chunks[0][COL_PIXELS].shape == (3, 64, 64, 3)
    by_id = dict(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist()))
    first = decode_rgb(by_id[chunks[0]["source_id"][0]])
    assert (chunks[0][COL_SOURCE_W][0], chunks[0][COL_SOURCE_H][0]) == first.size
    assert np.array_equal(chunks[0][COL_PIXELS][0], np.asarray(first.resize((64, 64), Image.BILINEAR)))
    assert [e for c in chunks for e in c[COL_ERROR]] == [""] * 7
    assert [i for c in chunks for i in c["pair_id"]] == plan_rows.column("pair_id").to_pylist()


def test_finish_images_resizes_back_records_failures_and_fits_the_schema(tmp_path):
    import json
    import os

    from diffmix_ray.contracts import SHARD_SCHEMA
    from diffmix_ray.generate.cpu_stages import COL_SOURCE_H, COL_SOURCE_W, finish_images

    n = 3
    batch = {"pair_id": np.array(["a", "b", "c"], dtype=object), "source_id": np.array(["x", "y", None], dtype=object),
             "source_label": np.array([0, 1, 2], dtype=np.int32), "target_label": np.array([1, 2, 0], dtype=np.int32),
             "strength": np.array([0.7] * n, dtype=np.float32), "seed": np.arange(n, dtype=np.int64),
             "mode": np.array(["diff-mix"] * n, dtype=object),
             COL_PIXELS: np.full((n, 64, 64, 3), 128, dtype=np.uint8),
             COL_SOURCE_W: np.array([50, 0, 10], dtype=np.int32), COL_SOURCE_H: np.array([30, 0, 10], dtype=np.int32),
             COL_ERROR: np.array(["", "", "generated image is black"], dtype=object),
             "prompt": np.array(["p0", "p1", "p2"], dtype=object)}
    out = finish_images(batch, str(tmp_path / "failed"), jpeg_quality=90)
    assert out.schema == SHARD_SCHEMA and out.column("pair_id").to_pylist() == ["a", "b"]
    assert out.column("width").to_pylist() == [50, 64] and out.column("height").to_pylist() == [30, 64]
    assert Image.open(io.BytesIO(out.column("image")[0].as_py())).size == (50, 30)
    assert out.column("source_id").to_pylist() == ["x", "y"]
    (record,) = os.listdir(tmp_path / "failed")
    assert json.load(open(tmp_path / "failed" / record)) == [{"pair_id": "c", "error": "generated image is black"}]
    empty = finish_images({k: v[2:] for k, v in batch.items()}, None, 90)
    assert empty.num_rows == 0 and empty.schema == SHARD_SCHEMA


@pytest.mark.parametrize("rows, batch, actors, resolution", [
    (6_400_000, 16, 8, 512), (6_400_000, 32, 8, 512), (640_000, 8, 1, 64), (100, 4, 2, 64), (13, 8, 4, 64)])
def test_blocks_are_whole_batches_about_a_shard_and_feed_every_actor(rows, batch, actors, resolution):
    from diffmix_ray.runtime.pool_stage import CHUNK_BYTES, block_rows

    cfg = GenerateConfig(dataset="d", mode="real-mix", batch_size=batch, max_actors=actors)
    block, chunk = block_rows(rows, cfg, cfg.rows_per_shard, resolution * resolution * 3)
    assert block % chunk == 0 and chunk % batch == 0
    assert chunk * resolution * resolution * 3 <= max(CHUNK_BYTES, batch * resolution * resolution * 3)
    assert block < cfg.rows_per_shard + chunk
    if rows >= 2 * actors * batch:
        assert rows / block >= 2 * actors * 0.5  # every actor gets blocks (rounding up to batches aside)
    if rows > 100_000:
        assert rows / block <= rows / 900  # ~a shard per block: thousands of blocks, not hundreds of thousands


def test_too_few_steps_for_the_strength_is_refused():
    with pytest.raises(DiffmixError, match="less than one denoising step"):
        GenerateConfig(dataset="d", mode="real-mix", strength=0.05, steps=10).validate()
    with pytest.raises(DiffmixError, match="needs --compile"):
        GenerateConfig(dataset="d", mode="real-mix", compile_cache="/tmp/x").validate()


@pytest.mark.slow
def test_compiled_unet_pads_batches_and_shares_its_cache(translator, sample_dataset, tiny_bank, tmp_path):
    """--compile: the UNet compiled once at start for the padded batch shape; a short batch is
    padded (same images as eager); the second actor loads the first one's kernels."""
    import os

    info = canonical.open_dataset(sample_dataset).info
    cache = str(tmp_path / "compile-cache")
    make = lambda: Translator("tiny", "mix", info.classes, info.super_class, concepts=tiny_bank, steps=6, threads=2,
                              batch_size=4, compile=True, compile_cache=cache)
    first = make()
    assert not first.compile_cache.loaded and len(os.listdir(cache)) == 1
    batch = _batch(sample_dataset, targets=[1, 2, 3], strengths=[0.7, 0.7, 0.5], seeds=[1, 2, 3])
    out = first(batch)  # groups of 2 and 1 pairs, each padded to 4
    assert list(out[COL_ERROR]) == [""] * 3
    assert _diff(out[COL_PIXELS], translator(batch)[COL_PIXELS]).max() <= 1
    second = make()
    assert second.compile_cache.loaded
    assert _diff(second(batch)[COL_PIXELS], out[COL_PIXELS]).max() == 0


def test_a_chunk_runs_in_device_batches_of_batch_size(translator, sample_dataset, monkeypatch):
    """Ray Data hands the actor whole chunks; the actor cuts device batches of --batch-size from
    each step group, and the images are those of one call per group."""
    batch = _batch(sample_dataset, targets=[1, 2, 3, 0, 2], strengths=[0.7, 0.7, 0.7, 0.3, 0.7],
                   seeds=[1, 2, 3, 4, 5])
    whole = translator(batch)
    sizes: list[int] = []
    real = translator.translate

    def recording(pixels, labels, seeds, n_steps):
        sizes.append(len(labels))
        return real(pixels, labels, seeds, n_steps)

    monkeypatch.setattr(translator, "batch_size", 2)
    monkeypatch.setattr(translator, "translate", recording)
    split = translator(batch)
    assert sorted(sizes) == [1, 2, 2]  # 0.3: one pair; 0.7: four pairs in batches of 2
    assert _diff(split[COL_PIXELS], whole[COL_PIXELS]).max() <= 1
