"""The sample world, its judge, and the shipped `sample` models as files: drawn deterministically, judged
right, loaded through the same code as any SD or CLIP folder, refused when a file is missing or altered,
and retrainable (a few steps of `model train-sample`, reproducibly). No Ray."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffmix_ray import sample_world as world
from diffmix_ray.data.sample import SAMPLE_CLASSES, write_sample_imagefolder
from diffmix_ray.errors import DiffmixError
from diffmix_ray.models import sample as sample_models


def _drawn(per_class: int, seed: int = 3) -> list[tuple[int, Image.Image]]:
    rng = np.random.default_rng(seed)
    return [(c, world.draw_class(c, rng)) for c in range(len(world.CLASSES)) for _ in range(per_class)]


def test_world_has_twelve_classes_with_fine_grained_pairs():
    assert len(SAMPLE_CLASSES) == len(world.CLASS_NAMES) >= 12
    assert len(set(world.CLASS_NAMES)) == len(world.CLASS_NAMES)
    by_shape, by_colour = {}, {}
    for colour, shape in world.CLASSES:
        by_shape.setdefault(shape, []).append(colour)
        by_colour.setdefault(colour, []).append(shape)
    assert ("red", "orange") in {tuple(v[:2]) for v in by_shape.values()}  # same shape, near colours
    assert any({"circle", "ring"} <= set(v) for v in by_colour.values())  # same colour, near shapes
    assert any({"square", "bar"} <= set(v) for v in by_colour.values())


def test_drawing_is_deterministic_and_varied(tmp_path):
    a = write_sample_imagefolder(str(tmp_path / "a"), num_classes=3, per_class=4, seed=5)
    b = write_sample_imagefolder(str(tmp_path / "b"), num_classes=3, per_class=4, seed=5)
    files = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    assert len(files) == 12
    assert all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read() for f in files)
    images = [np.asarray(world.draw_class(0, np.random.default_rng(i))) for i in range(2)]
    assert np.abs(images[0].astype(int) - images[1]).mean() > 10  # position, size, shade, background differ


@pytest.mark.parametrize("degrade", ["none", "jpeg", "blur", "half-resolution"])
def test_the_judge_reads_every_drawn_class(degrade):
    """Real images, also softened as generated ones are: all judged right. A judge that confused any two
    classes, colours or shapes would fail here (each class is drawn 25 times at random sizes and angles)."""
    def soften(im):
        if degrade == "jpeg":
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=92)
            return Image.open(buf)
        if degrade == "blur":
            return im.filter(ImageFilter.GaussianBlur(1.2))
        if degrade == "half-resolution":
            return im.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR)
        return im

    drawn = _drawn(25)
    judged = world.judge_labels(soften(im) for _, im in drawn)
    assert (judged == np.array([c for c, _ in drawn])).all()


def test_the_judge_finds_no_class_in_a_bare_background_or_a_grey_shape():
    rng = np.random.default_rng(0)
    assert all(world.judge(world.draw(c, None, rng)).label == world.NONE for c in world.COLOURS for _ in range(3))
    grey = np.full((32, 32, 3), 128, np.uint8)
    grey[8:24, 8:24] = 200  # a shape without colour
    assert world.judge(grey).label == world.NONE


# -------------------------------------------------------------------------------------------------
# The shipped models as files
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "clip"])
def test_shipped_weights_match_their_recorded_fingerprint(kind):
    folder = sample_models.shipped_dir(kind)
    record = json.load(open(os.path.join(folder, sample_models.RECORD)))
    assert sample_models.verify(folder) == record
    assert record["fingerprint"] == sample_models.files_fingerprint(record["files"])
    weights = [f for f in record["files"] if f.endswith(".safetensors")]
    assert weights and all(sample_models.file_sha256(os.path.join(folder, f)) == record["files"][f] for f in weights)
    for key in ("command", "seed", "versions", "phases", "wall_s", "config"):
        assert key in record
    assert all(p["final_loss"] < p["first_loss"] for p in record["phases"].values())


def test_shipped_weights_are_small_and_float16():
    from safetensors import safe_open

    total = 0
    for kind in ("sd", "clip"):
        folder = sample_models.shipped_dir(kind)
        for rel in json.load(open(os.path.join(folder, sample_models.RECORD)))["files"]:
            total += os.path.getsize(os.path.join(folder, rel))
            if rel.endswith(".safetensors"):
                with safe_open(os.path.join(folder, rel), "pt") as f:
                    assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, rel
    assert total <= 25 * 2**20


def test_sample_loads_as_sd_and_clip_folders_do():
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPModel

    from diffmix_ray.models.clip import load_clip, resolve_clip
    from diffmix_ray.models.loader import load_pipeline, resolve_model

    ref = resolve_model("sample")
    assert (ref.kind, ref.local_path, ref.resolution) == ("sample", sample_models.shipped_dir("sd"), 32)
    assert ref.fingerprint == resolve_model(sample_models.shipped_dir("sd")).fingerprint  # = the folder itself
    pipe, _ = load_pipeline("sample", device="cpu")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline) and pipe.unet.dtype == torch.float32
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    for word in ("red", "circle", "shape", "ktn"):  # the world's words and finetune's initializer: one token each
        assert len(pipe.tokenizer.encode(word, add_special_tokens=False)) == 1, word
    model, tokenizer, cref = load_clip("sample", device="cpu")
    assert isinstance(model, CLIPModel) and cref.kind == "sample" and cref.prep.output_hw == (32, 32)
    assert resolve_clip("sample").fingerprint == cref.fingerprint


@pytest.mark.parametrize("kind,damage", [("sd", "alter"), ("sd", "remove"), ("clip", "alter"), ("clip", "extra")])
def test_a_sample_folder_with_a_missing_or_altered_file_is_refused_by_name(tmp_path, kind, damage):
    from diffmix_ray.models.clip import resolve_clip
    from diffmix_ray.models.loader import resolve_model

    folder = str(tmp_path / kind)
    shutil.copytree(sample_models.shipped_dir(kind), folder)
    weights = "unet/diffusion_pytorch_model.safetensors" if kind == "sd" else "model.safetensors"
    resolve = resolve_model if kind == "sd" else resolve_clip
    resolve(folder)  # intact: loads
    path = os.path.join(folder, weights)
    if damage == "alter":
        data = bytearray(open(path, "rb").read())
        data[-7] ^= 0x01  # one bit of one weight
        open(path, "wb").write(bytes(data))
        named, why = weights, "altered"
    elif damage == "remove":
        os.remove(path)
        named, why = weights, "missing"
    else:
        shutil.copy(path, os.path.join(folder, "pytorch_model.bin"))
        named, why = "pytorch_model.bin", "not one of the files"
    with pytest.raises(DiffmixError, match=f"{named}.*{why}|{why}.*{named}" if why == "not one of the files" else
                       f"{named} (is|was) {why}"):
        resolve(folder)


def test_the_shipped_sample_is_refused_when_its_weights_change(tmp_path, monkeypatch):
    from diffmix_ray.models.loader import resolve_model

    copy = tmp_path / "sample_weights"
    shutil.copytree(sample_models.SHIPPED, copy)
    monkeypatch.setattr(sample_models, "SHIPPED", copy)
    os.remove(copy / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffmixError, match=r"shipped sample model .*vae/diffusion_pytorch_model.safetensors is missing"):
        resolve_model("sample")


def test_train_sample_runs_a_few_steps_reproducibly(tmp_path):
    """`model train-sample` end to end at a few steps per phase: both folders load through the loaders,
    carry a complete training record, and a second run with the same seed writes the same files."""
    from diffmix_ray.models.clip import load_clip
    from diffmix_ray.models.loader import load_pipeline
    from diffmix_ray.models.sample_train import TrainSampleConfig, train_sample

    cfg = TrainSampleConfig(seed=3, images_per_class=4, backgrounds=4, vae_steps=2, vae_batch=4, unet_steps=2,
                            unet_batch=4, clip_steps=2, clip_batch=8, warmup_steps=1, threads=1, log_every=1)
    first = train_sample(str(tmp_path / "a"), cfg, command="test")
    second = train_sample(str(tmp_path / "b"), cfg, command="test")
    for kind in ("sd", "clip"):
        assert first[kind]["fingerprint"] == second[kind]["fingerprint"]
        assert first[kind]["seed"] == 3 and first[kind]["command"] == "test"
        assert sample_models.verify(str(tmp_path / "a" / kind)) == first[kind]
    assert set(first["sd"]["phases"]) == {"vae", "unet+text"} and set(first["clip"]["phases"]) == {"clip"}
    assert first["sd"]["phases"]["unet+text"]["steps"] == 2
    other = train_sample(str(tmp_path / "c"), TrainSampleConfig(**{**cfg.__dict__, "seed": 4}), command="test")
    assert other["sd"]["fingerprint"] != first["sd"]["fingerprint"]
    pipe, ref = load_pipeline(str(tmp_path / "a" / "sd"), device="cpu")
    assert ref.resolution == 32 and pipe.vae.config.scaling_factor > 0
    load_clip(str(tmp_path / "a" / "clip"), device="cpu")
    with pytest.raises(DiffmixError, match="not empty"):
        train_sample(str(tmp_path / "a"), cfg)


def test_judged_report_reads_a_generate_output_of_the_sample_world(tmp_path):
    """orchestrate/judged.py on a generate output whose images are the sources themselves (a translation
    that changed nothing): the judge sees every source class and no target; a dataset of other classes
    is refused."""
    from diffmix_ray.data.prepare import PrepareConfig, prepare
    from diffmix_ray.orchestrate.judged import judge_synthetic, judged_markdown, of_the_sample_world

    from tests.fixtures import fake_synthetic, make_imagefolder

    raw = write_sample_imagefolder(str(tmp_path / "raw"), num_classes=5, per_class=4, seed=1)
    dataset = str(tmp_path / "dataset")
    prepare(PrepareConfig("imagefolder", raw, super_class="shape", val_fraction=0), dataset, show_progress=False)
    syn = fake_synthetic(str(tmp_path / "syn"), dataset, strength=0.3)
    assert of_the_sample_world(syn)  # so the report judges it
    rows = judge_synthetic(syn)
    assert [(r["strength"], r["pairs"], r["target"], r["source"]) for r in rows] == [(0.3, 20, 0.0, 1.0)]
    assert rows[0]["label_target_weight"] == pytest.approx(0.3 ** 0.5)
    assert "| 0.30 | 20 | 0% | 100% | 0% | 0.55 |" in judged_markdown(rows, "t")
    other = str(tmp_path / "other")
    prepare(PrepareConfig("imagefolder", make_imagefolder(str(tmp_path / "raw2"), {"cat": 2, "dog": 2}),
                          super_class="pet", val_fraction=0), other, show_progress=False)
    syn2 = fake_synthetic(str(tmp_path / "syn2"), other, strength=0.3)
    assert not of_the_sample_world(syn2)  # the report leaves it out
    with pytest.raises(DiffmixError, match="not the sample world's"):
        judge_synthetic(syn2)
