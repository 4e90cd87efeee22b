"""`score` without Ray: CLIP specs (presets, folders, s3://, hub ids) and their refusals, the CPU
stage's preprocessing against transformers' and timm's own, and the scoring actor against a bare
CLIP computation of the same scores."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from diffmix_ray import canonical, storage
from diffmix_ray.contracts import COL_IMAGE, COL_LABEL, SCORE_COLUMNS, object_prompts
from diffmix_ray.errors import DiffmixError
from diffmix_ray.models import clip as clip_mod
from diffmix_ray.models import loader
from diffmix_ray.models import spec as model_spec
from diffmix_ray.models.clip import OPENAI_MEAN, OPENAI_STD, build_clip, load_clip, resolve_clip, write_clip
from diffmix_ray.score.config import ScoreConfig
from diffmix_ray.score.cpu_stages import COL_ERROR, classifier_pixels, clip_pixels, decode_pairs, finish_scores
from diffmix_ray.score.scorer import Scorer, class_prompts


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return write_clip("tiny:3", str(tmp_path_factory.mktemp("clip") / "tiny"))


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


# ---------------------------------------------------------------------------------------------
# CLIP specs
# ---------------------------------------------------------------------------------------------
def test_tiny_clip_is_built_offline_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, tok = build_clip("tiny", 0)
    b, _ = build_clip("tiny", 0)
    c, _ = build_clip("tiny", 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(image_features(a, x), image_features(b, x))
    assert not torch.allclose(image_features(a, x), image_features(c, x))
    ids = tok(["a photo of a bird"], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == a.config.text_config.eos_token_id


def test_clip_b32_preset_has_vit_b32s_architecture_without_materialising_weights():
    model, tokenizer = build_clip("clip-b32", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 151_277_313  # openai/clip-vit-base-patch32's count
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (768, 3, 32, 32)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (50, 768)  # 7x7 patches + CLS
    assert shapes["text_model.embeddings.token_embedding.weight"] == (49408, 512) and len(tokenizer) == 49408
    assert shapes["visual_projection.weight"] == (512, 768) and shapes["text_projection.weight"] == (512, 512)
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "quick_gelu"
    assert resolve_clip("clip-b32").prep.output_hw == (224, 224)


def test_clip_folder_loads_like_the_preset_it_was_written_from(clip_dir):
    assert sorted(os.listdir(clip_dir)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                            "tokenizer.json", "tokenizer_config.json"]
    model, tokenizer, ref = load_clip(clip_dir)
    preset, _ = build_clip("tiny", 3)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(image_features(model, x), image_features(preset, x))
    assert (ref.kind, ref.local_path) == ("dir", clip_dir)
    assert ref.prep == resolve_clip("tiny").prep  # the processor config round-trips
    assert ref.fingerprint == loader.dir_fingerprint(clip_dir) != resolve_clip("tiny:3").fingerprint
    with pytest.raises(DiffmixError, match="not empty"):
        write_clip("tiny", clip_dir)


def test_a_folder_that_is_not_a_clip_model_is_refused(clip_dir, tmp_path):
    sd = loader.write_model("tiny", str(tmp_path / "sd"))
    with pytest.raises(DiffmixError, match="diffusers pipeline folder .* not a CLIP model"):
        resolve_clip(sd)
    bert = tmp_path / "bert"
    bert.mkdir()
    for name in os.listdir(clip_dir):
        (bert / name).write_bytes(open(os.path.join(clip_dir, name), "rb").read())
    config = json.loads((bert / "config.json").read_text()) | {"model_type": "bert"}
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffmixError, match="model_type 'bert', not 'clip'"):
        resolve_clip(str(bert))
    os.remove(bert / "tokenizer.json")
    os.remove(bert / "preprocessor_config.json")
    with pytest.raises(DiffmixError, match="missing preprocessor_config.json, tokenizer.json") as err:
        resolve_clip(str(bert))
    assert "make-clip" in str(err.value)
    with pytest.raises(DiffmixError, match="does not exist"):
        resolve_clip(str(tmp_path / "nothing"))


def test_unknown_spec_and_hub_ids(clip_dir, monkeypatch):
    import huggingface_hub

    with pytest.raises(DiffmixError, match="unknown --clip spec 'bogus'"):
        resolve_clip("bogus")
    with pytest.raises(DiffmixError, match="seed after ':' must be an integer"):
        resolve_clip("tiny:x")

    def forbidden(*args, **kwargs):
        pytest.fail("a hub download or network connection was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    with pytest.raises(DiffmixError, match="HF_HUB_OFFLINE=1 forbids hub downloads") as err:
        resolve_clip("openai/clip-vit-base-patch32")
    assert "huggingface-cli download openai/clip-vit-base-patch32" in str(err.value)

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append((repo, kw)) or clip_dir)  # stands in for the hub
    ref = resolve_clip("some-org/some-clip")
    assert (ref.kind, ref.local_path) == ("hub", clip_dir)
    assert asked == [("some-org/some-clip", {"allow_patterns": clip_mod.HUB_PATTERNS})]


def test_s3_clip_is_staged_once(clip_dir, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    uri = write_clip(clip_dir, s3_env.make_bucket("clip") + "/models/tiny")
    downloads = []
    real = model_spec._download_files
    monkeypatch.setattr(model_spec, "_download_files", lambda *a: (downloads.append(a), real(*a)))
    first, again = resolve_clip(uri), resolve_clip(uri)
    assert first.kind == "s3" and first.local_path.startswith(str(tmp_path / "cache"))
    assert first == again and len(downloads) == 1
    assert first.fingerprint == loader.dir_fingerprint(clip_dir)
    fs, root = storage.filesystem(uri)
    fs.rm(f"{root}/preprocessor_config.json")
    with pytest.raises(DiffmixError, match="missing preprocessor_config.json"):
        resolve_clip(uri)  # refused from the listing, before downloading


# ---------------------------------------------------------------------------------------------
# Preprocessing and the actor
# ---------------------------------------------------------------------------------------------
def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,side", [((50, 37), 32), ((37, 61), 32), ((641, 479), 224)])
def test_cpu_preprocessing_equals_clips_processor_and_the_classifiers_eval_pipelines(size, side):
    from transformers.models.clip import CLIPImageProcessorPil

    from diffmix_ray.classify.transforms import data_config, pipeline

    img = random_image(*size)
    prep = dict(shortest_edge=side, size=None, crop=(side, side), resample=Image.BICUBIC)
    ours = (clip_pixels(img, prep) / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    theirs = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})(
        images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    for cfg in (data_config("test_resnet", "timm", 48, None), data_config("resnet18", "timm", None, None),
                data_config("test_resnet", "reference", None, 224),
                data_config("test_resnet", "reference-lt", None, 224)):
        # both end in uint8 pixels (normalisation is the device's last step in train-cls and score alike)
        np.testing.assert_array_equal(classifier_pixels(img, cfg), pipeline(cfg, training=False)(img), str(cfg))


def test_scorer_equals_a_bare_clip_computation_and_flags_bad_images(sample_dataset):
    """The actor's scores for a batch as the CPU stage makes it equal those computed the plain
    way (CLIPProcessor + CLIPModel forward, as the reference's filter script does)."""
    from transformers.models.clip import CLIPImageProcessorPil

    info = canonical.open_dataset(sample_dataset).info
    train = canonical.open_dataset(sample_dataset).read_split("train", [COL_IMAGE, COL_LABEL]).to_pylist()[:5]
    images = [r["image"] for r in train]
    synthetic = images[1:] + [b"\xff\xd8 not a jpeg"]  # the last pair's image fails to decode
    keys = {"pair_id": np.array([f"p{i}" for i in range(5)], dtype=object),
            "source_id": np.array(["s0", "s0", "s1", "", "s3"], dtype=object),  # pairs 0 and 1 share a source
            "source_label": np.array([0, 0, 1, 2, 3]), "target_label": np.array([1, 2, 3, 0, 1]),
            "_src_file": np.array([0, 0, 0, -1, 0])}  # pair 3: text-to-image, no source
    sources = [images[0], images[0], images[2], None, images[3]]
    prep = resolve_clip("tiny").prep
    batch = decode_pairs(keys, synthetic, sources, keys["_src_file"] >= 0, dataclasses.asdict(prep), None)
    scorer = Scorer("tiny", info.classes, info.super_class)
    result = scorer(batch)
    assert [bool(e) for e in result[COL_ERROR]] == [False] * 4 + [True]
    assert "synthetic image failed to decode" in result[COL_ERROR][4]

    model, tokenizer = build_clip("tiny")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in synthetic[:4]]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]

    def logits(prompts):
        with torch.no_grad():
            text = tokenizer(prompts, padding=True, return_tensors="pt")
            return model(pixel_values=pixels, **text).logits_per_image

    probs = logits(class_prompts(info.classes, info.super_class)).softmax(-1).numpy()
    rows = np.arange(4)
    np.testing.assert_allclose(result["clip_target_prob"][:4], probs[rows, keys["target_label"][:4]], atol=1e-5)
    np.testing.assert_allclose(result["clip_source_prob"][:4], probs[rows, keys["source_label"][:4]], atol=1e-5)
    cos = logits(class_prompts(info.classes, info.super_class)).numpy() / model.logit_scale.exp().item()
    np.testing.assert_allclose(result["clip_target_sim"][:4], cos[rows, keys["target_label"][:4]], atol=1e-5)
    np.testing.assert_allclose(result["clip_source_sim"][:4], cos[rows, keys["source_label"][:4]], atol=1e-5)
    obj = logits(list(object_prompts(info.super_class))).softmax(-1)[:, 0].numpy()
    np.testing.assert_allclose(result["clip_object_prob"][:4], obj, atol=1e-5)
    emb = torch.nn.functional.normalize(image_features(model, pixels), dim=-1)
    src = torch.nn.functional.normalize(image_features(model, processor(
        images=[Image.open(io.BytesIO(images[i])).convert("RGB") for i in (0, 0, 2)], return_tensors="pt")[
        "pixel_values"]), dim=-1)
    np.testing.assert_allclose(result["clip_source_image_sim"][:3], (emb[:3] * src).sum(-1).numpy(), atol=1e-5)
    assert np.isnan(result["clip_source_image_sim"][3])
    assert np.isnan(result["classifier_target_prob"]).all()  # no classifier given

    table = finish_scores(result, None)  # the failed pair is left out; no source -> null, not NaN
    assert table.column("pair_id").to_pylist() == ["p0", "p1", "p2", "p3"]
    assert table.column("clip_source_image_sim").null_count == 1
    assert table.column("classifier_source_prob").null_count == 4
    assert set(SCORE_COLUMNS) <= set(table.column_names)


def test_score_config_is_checked():
    with pytest.raises(DiffmixError, match="--name '../x' must be a folder name"):
        ScoreConfig(synthetic="x", clip="tiny", name="../x").validate()
    with pytest.raises(DiffmixError, match="--min-actors"):
        ScoreConfig(synthetic="x", clip="tiny", min_actors=2, max_actors=1).validate()


def test_cpu_stage_reads_only_the_rows_it_needs_from_local_or_s3_shards(sample_dataset, s3_env, tmp_path):
    """prepare_images reads each pair's synthetic and source image by (file, row), from local
    files and from S3 alike, and yields bounded chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffmix_ray.score.cpu_stages import COL_CLIP, COL_CLIP_SRC, prepare_images

    train = canonical.open_dataset(sample_dataset).read_split("train", ["image_id", COL_IMAGE]).slice(0, 6)
    local = str(tmp_path / "shard.parquet")
    pq.write_table(pa.table({"image": train.column(COL_IMAGE)}), local, row_group_size=2)
    remote = s3_env.make_bucket("shards") + "/shard.parquet"
    fs, path = storage.filesystem(remote)
    fs.put_file(local, path)
    todo = pa.table({"pair_id": ["a", "b", "c"], "source_id": ["x", None, "x"], "source_label": [0, 1, 0],
                     "target_label": [1, 1, 2], "_syn_file": pa.array([0, 1, 1], pa.int32()),
                     "_syn_row": pa.array([5, 0, 3], pa.int64()), "_src_file": pa.array([0, -1, 0], pa.int32()),
                     "_src_row": pa.array([1, -1, 1], pa.int64())})
    prep = dataclasses.asdict(resolve_clip("tiny").prep)
    chunks = list(prepare_images(todo, [local, remote], [local], prep, None, chunk_rows=2))
    assert [len(c["pair_id"]) for c in chunks] == [2, 1]
    batch = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    images = train.column(COL_IMAGE).to_pylist()
    expect = [clip_pixels(Image.open(io.BytesIO(images[i])).convert("RGB"), prep) for i in (5, 0, 3)]
    np.testing.assert_array_equal(batch[COL_CLIP], np.stack(expect))
    np.testing.assert_array_equal(batch[COL_CLIP_SRC][[0, 2]], np.stack([clip_pixels(Image.open(io.BytesIO(
        images[1])).convert("RGB"), prep)] * 2))
    assert not batch[COL_CLIP_SRC][1].any() and list(batch["source_id"]) == ["x", "", "x"]


def test_plan_blocks_are_bounded_and_cut_at_shard_boundaries():
    import pyarrow as pa

    from diffmix_ray.runtime.pool_stage import block_rows, cut_blocks
    from diffmix_ray.score.run import BLOCK_ROWS, ScoreStage

    def blocks(shard_sizes, block):
        files = np.repeat(np.arange(len(shard_sizes)), shard_sizes)
        todo = pa.table({"_syn_file": pa.array(files, pa.int32()), "_syn_row": np.arange(len(files))})
        parts = cut_blocks(todo, block, ScoreStage.block_group)
        assert pa.concat_tables(parts).equals(todo)  # every row once, in order
        return [p.num_rows for p in parts]

    assert blocks([3, 3, 3], 4) == [3, 3, 3]  # never straddles a shard it could keep whole
    assert blocks([2, 2, 2, 2], 4) == [4, 4]  # small shards share a block
    assert blocks([10], 4) == [4, 4, 2]  # a big shard: whole blocks of it
    assert blocks([1, 9, 1], 4) == [1, 4, 4, 2]
    cfg = ScoreConfig(synthetic="x", clip="tiny", batch_size=8, rows_per_file=20)
    assert block_rows(10_000, cfg, min(BLOCK_ROWS, 20), 3 * 32 * 32)[0] == 24  # at most a score file (whole batches)
    cfg = ScoreConfig(synthetic="x", clip="tiny", batch_size=8)
    assert block_rows(10_000, cfg, BLOCK_ROWS, 3 * 32 * 32)[0] == 1024
    assert block_rows(40, cfg, BLOCK_ROWS, 3 * 32 * 32)[0] == 24  # 2 per actor


def test_the_cpu_stages_import_neither_torch_nor_ray():
    """Ray workers import score.cpu_stages to run the stages beside the actors: seconds of torch
    imports per worker would steal the actors' CPU (and classifier.py's driver side needs none)."""
    import subprocess
    import sys

    code = ("import sys, diffmix_ray.score.cpu_stages, diffmix_ray.score.classifier, diffmix_ray.score.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'timm', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
