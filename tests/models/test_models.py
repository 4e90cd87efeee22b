"""The model kit: offline presets, the diffusers folder round trip, spec resolution, S3 staging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from diffmix_ray.errors import DiffmixError
from diffmix_ray.models import (
    build_pipeline,
    build_tokenizer,
    dir_fingerprint,
    load_pipeline,
    model_fingerprint,
    runtime_policy,
    stage_model,
    to_text2img,
    write_model,
    write_preset,
)
from diffmix_ray.models import loader, preset_modules, preset_tokenizer
from diffmix_ray.models import spec as model_spec
from diffmix_ray.models.presets import PRESETS, PROMPT_WORDS

PROMPTS = ["a photo of a bird", "a photo of a flower"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_preset("tiny", str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(loader.CACHE_ENV, str(cache))
    return cache


def _read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def _weights(pipe):
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def _img2img(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return pipe(prompt=PROMPTS, image=[image, image], strength=0.5, num_inference_steps=4,
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np").images


def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone():
    a, b, c = (_weights(build_pipeline("tiny", seed)) for seed in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pipeline("tiny", 5)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_handles_prompt_words_and_any_text():
    tok = build_tokenizer()
    for word in PROMPT_WORDS:
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    ids = tok("a photo of a <class_3> bird, ünïcødé 漢字 🐦").input_ids
    assert tok.decode(ids, skip_special_tokens=True).startswith("a photo of a < class _ 3 > bird")
    assert len(tok("bird " * 200, truncation=True).input_ids) == 77


def test_written_folder_has_the_stable_diffusion_layout(tiny_dir):
    index = _read_json(tiny_dir, "model_index.json")
    assert index["_class_name"] == "StableDiffusionImg2ImgPipeline"
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_dir, component)), component
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert os.path.isfile(os.path.join(tiny_dir, rel)), rel
    scheduler = _read_json(tiny_dir, "scheduler", "scheduler_config.json")
    assert scheduler["_class_name"] == "PNDMScheduler"
    betas = (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"])
    assert betas == (0.00085, 0.012, "scaled_linear")
    assert scheduler["skip_prk_steps"] is True and scheduler["steps_offset"] == 1
    assert _read_json(tiny_dir, "vae", "config.json")["scaling_factor"] == 0.18215


def test_make_tiny_round_trip_matches_in_memory_pipeline(tiny_dir):
    pipe, ref = load_pipeline(tiny_dir)
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline" and pipe.safety_checker is None
    assert (ref.kind, ref.local_path, ref.resolution) == ("dir", tiny_dir, 64)
    assert ref.fingerprint == dir_fingerprint(tiny_dir) == model_fingerprint(tiny_dir)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"

    loaded, in_memory = _img2img(pipe), _img2img(build_pipeline("tiny", 0))
    assert loaded.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(loaded, in_memory, atol=1e-6)

    text2img = to_text2img(pipe)
    assert type(text2img).__name__ == "StableDiffusionPipeline" and text2img.unet is pipe.unet
    out = text2img(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pil").images
    assert out[0].size == (64, 64)


def test_presets_resolve_without_files():
    pipe, ref = load_pipeline("tiny:3", pipeline="text2img")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert (ref.kind, ref.local_path, ref.resolution) == ("preset", None, 64)
    assert ref.fingerprint != model_fingerprint("tiny") == model_fingerprint("tiny:0")
    assert model_fingerprint("bench") != model_fingerprint("tiny")
    assert PRESETS["bench"].resolution == 128
    with pytest.raises(DiffmixError, match="must be an integer"):
        load_pipeline("tiny:x")
    with pytest.raises(DiffmixError, match="unknown pipeline kind"):
        load_pipeline("tiny", pipeline="inpaint")


def test_existing_presets_keep_their_fingerprints():
    # Concept banks and generate manifests record these; a new PresetConfig field must not move them.
    assert PRESETS["tiny"].fingerprint(0) == "36b1dd77810ef7834238add5c5630874818c8e963905233fcc252e0faa4d6d49"
    assert PRESETS["tiny"].fingerprint(7) == "67e240a5c8173ab47e6b4f16c464192e40b4d91b7049d6e178914883481a8fd7"
    assert PRESETS["bench"].fingerprint(0) == "979941f82c37ef402a567e98d9c626da1755e3f75dee9088af4cdbc08c6b2a9a"
    assert PRESETS["bench"].fingerprint(7) == "a3d26e0bf5cc9c4d550ee7e4b4fa7db87463cda4e29c586c542afa1d31f82583"
    assert len({PRESETS[name].fingerprint(0) for name in PRESETS}) == len(PRESETS)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_has_sd15s_architecture_without_materialising_weights():
    modules = preset_modules("sd15")  # meta device: shapes only, no 4 GB of weights
    assert all(p.is_meta for m in modules.values() for p in m.parameters())
    unet, vae, text = modules["unet"], modules["vae"], modules["text_encoder"]
    assert (_n_params(unet), _n_params(vae), _n_params(text)) == (859_520_964, 83_653_863, 123_060_480)

    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (unet.config.layers_per_block, unet.config.attention_head_dim) == (2, 8)
    assert (unet.config.norm_num_groups, unet.config.norm_eps, unet.config.use_linear_projection) == (32, 1e-5, False)

    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert (vae.config.layers_per_block, vae.config.norm_num_groups, vae.config.latent_channels) == (2, 32, 4)
    assert (vae.config.sample_size, vae.config.scaling_factor) == (512, 0.18215)

    c = text.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (49408, 768, 3072, 12)
    assert (c.num_attention_heads, c.max_position_embeddings, c.hidden_act) == (12, 77, "quick_gelu")
    assert (c.projection_dim, c.layer_norm_eps) == (768, 1e-5)

    config = PRESETS["sd15"]
    assert (config.resolution, config.latent_size, config.write_dtype) == (512, 64, "float16")
    ref = loader.resolve_model("sd15:3")  # resolving a preset builds nothing
    assert (ref.kind, ref.resolution, ref.fingerprint) == ("preset", 512, config.fingerprint(3))


def test_sd15_tokenizer_matches_the_embedding_rows_and_grows_with_class_tokens(tmp_path):
    tok, small = preset_tokenizer("sd15"), build_tokenizer()
    assert len(tok) == 49408 == PRESETS["sd15"].text_vocab_size
    assert len(preset_tokenizer("tiny")) == len(small) < 600  # the other presets' tokenizer is unchanged
    assert (tok.bos_token_id, tok.eos_token_id) == (small.bos_token_id, small.eos_token_id) == (0, 1)
    text = "a photo of a <unused 600> bird, ünïcødé"
    assert tok(text).input_ids == small(text).input_ids  # the fillers are never produced
    assert max(tok(text).input_ids) < len(small)

    tok.save_pretrained(tmp_path)  # what a written sd15 folder holds, and what finetune reloads
    tok = type(tok).from_pretrained(tmp_path, local_files_only=True)
    assert len(tok) == 49408
    classes = ["<class_0>", "<class_1>", "<class_2>"]
    assert tok.add_tokens(classes) == 3 and len(tok) == 49408 + 3
    assert tok.convert_tokens_to_ids(classes) == [49408, 49409, 49410]
    text_encoder = preset_modules("sd15")["text_encoder"]
    text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)  # as textual inversion does
    assert text_encoder.get_input_embeddings().weight.shape == (49408 + 3, 768)


def _cli(*args):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    return CliRunner().invoke(app, ["model", *args])


def test_model_make_writes_a_preset_that_loads_back(tiny_dir, tmp_path):
    made = _cli("make", "--preset", "tiny", str(tmp_path / "tiny"))
    assert made.exit_code == 0, made.output
    assert dir_fingerprint(str(tmp_path / "tiny")) == dir_fingerprint(tiny_dir)  # float32, as written before
    alias = _cli("make-tiny", str(tmp_path / "alias"))  # the old name keeps working
    assert alias.exit_code == 0, alias.output
    assert dir_fingerprint(str(tmp_path / "alias")) == dir_fingerprint(tiny_dir)

    half = _cli("make", "--preset", "tiny", "--seed", "3", "--dtype", "float16", str(tmp_path / "half"))
    assert half.exit_code == 0 and "float16" in half.output, half.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to caplog's
    try:
        pipe, _ = load_pipeline(str(tmp_path / "half"))  # float32 on CPU, from float16 files
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert not [r for r in logged if "kept in float32" in r.getMessage()]  # no false alarm on the dtype cast
    expected = _weights(build_pipeline("tiny", 3))
    assert all(torch.equal(v, expected[k].half().float()) for k, v in _weights(pipe).items())


def test_model_make_refuses_bad_arguments_before_building(tiny_dir, tmp_path, monkeypatch):
    from diffmix_ray.models import presets

    monkeypatch.setattr(presets, "_modules", lambda *a: pytest.fail("built a model for a bad command"))
    unknown = _cli("make", "--preset", "sd14", str(tmp_path / "x"))
    assert unknown.exit_code == 2
    assert "unknown model preset 'sd14'" in unknown.output and "'sd15'" in unknown.output
    bad_dtype = _cli("make", "--preset", "sd15", "--dtype", "int8", str(tmp_path / "x"))
    assert bad_dtype.exit_code == 2 and "float16" in bad_dtype.output and "float32" in bad_dtype.output
    with pytest.raises(DiffmixError, match="applies only to built-in presets"):
        write_model(tiny_dir, str(tmp_path / "copy"), dtype="float16")
    assert not (tmp_path / "x").exists() and not (tmp_path / "copy").exists()


def test_model_stage_all_nodes_refuses_a_local_folder_before_joining_ray(tmp_path, monkeypatch):
    """Only an s3:// folder can be staged on every node (a local one is already where it is); said
    before any Ray is joined. Staging itself runs on a live head: tests/e2e/test_ops.py."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("joined Ray for a local folder"))
    local = _cli("stage", str(tmp_path), "--all-nodes")
    assert local.exit_code == 2 and "stages an s3:// model folder" in local.output, local.output


def test_interrupted_preset_write_is_refused_as_incomplete(tmp_path, monkeypatch):
    import diffusers

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    # The scheduler is saved just before model_index.json: stop the write there.
    monkeypatch.setattr(diffusers.PNDMScheduler, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        write_model("tiny", str(tmp_path / "m"))
    assert (tmp_path / "m" / "unet").is_dir()
    with pytest.raises(DiffmixError, match="model_index.json"):
        load_pipeline(str(tmp_path / "m"))


def test_a_shipped_folder_resolves_by_name_like_the_folder_itself(tiny_dir, tmp_path):
    """A kind may ship folders under preset-like names (spec.ModelKind.shipped): the name resolves to the
    folder, checked like any folder, with the folder's fingerprint and the name as its kind."""
    import dataclasses

    sd = dataclasses.replace(loader.SD, shipped={"mine": lambda: tiny_dir})
    ref = model_spec.resolve(sd, "mine")
    assert (ref.kind, ref.local_path, ref.preset) == ("mine", tiny_dir, None)
    assert ref.fingerprint == model_spec.resolve(sd, tiny_dir).fingerprint == dir_fingerprint(tiny_dir)
    assert model_spec.resolve(sd, "tiny:2").fingerprint == loader.resolve_model("tiny:2").fingerprint
    broken = dataclasses.replace(loader.SD, shipped={"mine": lambda: str(tmp_path)})
    with pytest.raises(DiffmixError, match="missing model_index.json"):
        model_spec.resolve(broken, "mine")


@pytest.mark.parametrize("remove", ["vae", "model_index.json"])
def test_incomplete_folder_is_refused_naming_the_missing_part(tiny_dir, tmp_path, remove):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DiffmixError, match=remove) as err:
        load_pipeline(str(broken))
    assert str(broken) in str(err.value)
    with pytest.raises(DiffmixError, match="does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))


def test_hub_id_with_hub_offline_fails_without_touching_the_network(monkeypatch):
    import diffusers
    import huggingface_hub

    def forbidden(*args, **kwargs):
        pytest.fail("a hub download or network connection was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, forbidden)
    for name in ("download", "from_pretrained"):
        monkeypatch.setattr(diffusers.DiffusionPipeline, name, classmethod(forbidden))
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    with pytest.raises(DiffmixError, match="HF_HUB_OFFLINE=1 forbids hub downloads") as err:
        load_pipeline("some-org/some-model")
    assert "huggingface-cli download some-org/some-model" in str(err.value)


def test_hub_id_goes_through_the_hub_cache_when_online(tiny_dir, monkeypatch):
    import diffusers

    asked = []

    def fake_download(cls, repo_id, **kwargs):  # stands in for the hub: returns a snapshot folder
        asked.append((repo_id, kwargs))
        return tiny_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "download", classmethod(fake_download))
    _, ref = load_pipeline("some-org/some-model")
    assert asked == [("some-org/some-model", {"safety_checker": None, "feature_extractor": None})]
    assert (ref.kind, ref.local_path, ref.fingerprint) == ("hub", tiny_dir, dir_fingerprint(tiny_dir))


def test_runtime_policy():
    assert runtime_policy("cpu") == ("cpu", torch.float32)
    assert runtime_policy("cpu", "bf16") == ("cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        assert runtime_policy() == ("cpu", torch.float32)
        with pytest.raises(DiffmixError, match="a CUDA device was requested but torch .* sees none on this machine"):
            runtime_policy("cuda")
    with pytest.raises(DiffmixError, match="float16 on CPU"):
        runtime_policy("cpu", torch.float16)
    with pytest.raises(DiffmixError, match="float16 on CPU"):
        load_pipeline("tiny", device="cpu", dtype="fp16")


def test_spec_credentials_are_stripped():
    assert loader.redact("s3://AKIA:secret@bucket/m?X-Amz-Signature=abc") == "s3://bucket/m"
    assert loader.redact("https://user:token@example.com/m") == "https://example.com/m"
    assert loader.redact("org/model") == "org/model"


def test_write_model_copies_any_spec_and_refuses_non_empty_output(tiny_dir, tmp_path):
    out = write_model("tiny", str(tmp_path / "a"))
    assert dir_fingerprint(out) == dir_fingerprint(tiny_dir)  # saving is deterministic too
    copy = write_model(tiny_dir, str(tmp_path / "b"))
    assert dir_fingerprint(copy) == dir_fingerprint(tiny_dir)
    with pytest.raises(DiffmixError, match="not empty"):
        write_model("tiny", out)


def _upload(s3_env, tiny_dir):
    import s3fs

    uri = s3_env.make_bucket("models") + "/models/tiny"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint})
    fs.put(tiny_dir + "/", uri.removeprefix("s3://") + "/", recursive=True)
    return uri, fs


def test_s3_model_is_staged_once_and_matches_the_local_folder(tiny_dir, s3_env, model_cache, monkeypatch):
    uri, fs = _upload(s3_env, tiny_dir)
    downloads = []
    real_download = model_spec._download_files
    monkeypatch.setattr(model_spec, "_download_files", lambda *a: (downloads.append(a), real_download(*a)))

    pipe, ref = load_pipeline(uri)
    assert (ref.kind, ref.spec) == ("s3", uri)
    assert ref.local_path.startswith(str(model_cache)) and len(downloads) == 1
    assert ref.fingerprint == dir_fingerprint(tiny_dir)
    np.testing.assert_allclose(_img2img(pipe), _img2img(build_pipeline("tiny", 0)), atol=1e-6)

    _, again = load_pipeline(uri)
    assert again == ref and len(downloads) == 1  # the staged copy is reused

    # A changed remote model is a different cache entry, staged afresh.
    config = _read_json(tiny_dir, "scheduler", "scheduler_config.json") | {"steps_offset": 1}
    fs.pipe_file(uri.removeprefix("s3://") + "/scheduler/scheduler_config.json", json.dumps(config).encode())
    changed = stage_model(uri)
    assert changed != ref.local_path and len(downloads) == 2


def test_concurrent_staging_downloads_once(tiny_dir, s3_env, model_cache, monkeypatch):
    uri, _ = _upload(s3_env, tiny_dir)
    downloads = []
    real_download = model_spec._download_files
    monkeypatch.setattr(model_spec, "_download_files", lambda *a: (downloads.append(a), real_download(*a)))

    paths, errors = [], []

    def stage():
        try:
            paths.append(stage_model(uri))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(downloads) == 1
    entries = sorted(p.name for p in model_cache.iterdir() if not p.name.endswith(".lock"))
    assert entries == [os.path.basename(paths[0])]  # no leftover staging folders


def test_write_model_to_s3_then_stage_it_back(tiny_dir, s3_env, model_cache):
    uri = write_model("tiny", s3_env.make_bucket("made") + "/tiny")
    assert dir_fingerprint(stage_model(uri)) == dir_fingerprint(tiny_dir)
    with pytest.raises(DiffmixError, match="not empty"):
        write_model("tiny", uri)


def test_incomplete_s3_model_is_refused_before_downloading(tiny_dir, s3_env, model_cache, monkeypatch):
    uri, fs = _upload(s3_env, tiny_dir)
    fs.rm(uri.removeprefix("s3://") + "/vae", recursive=True)
    monkeypatch.setattr(model_spec, "_download_files", lambda *a: pytest.fail("downloaded an incomplete model"))
    with pytest.raises(DiffmixError, match="vae/"):
        load_pipeline(uri)
    with pytest.raises(DiffmixError, match="holds no files"):
        load_pipeline(uri + "-nothing-here")


def test_the_classifier_factory_loads_a_trained_state_strictly_and_refuses_unknown_archs():
    """models.classifier.create_classifier builds every timm classifier (train-cls, evaluate, score): a trained
    run's state dict gives back the same function; a state for another class count, or a name timm does not
    know, is refused."""
    import timm
    import torch

    from diffmix_ray.models import create_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trained = timm.create_model("test_resnet", num_classes=3).eval()
    rebuilt = create_classifier("test_resnet", 3, trained.state_dict()).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        assert torch.equal(trained(x), rebuilt(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        create_classifier("test_resnet", 4, trained.state_dict())
    with pytest.raises(DiffmixError, match="--arch 'resnet_5O' is not a timm architecture; similar: .*resnet50"):
        create_classifier("resnet_5O", 3)
