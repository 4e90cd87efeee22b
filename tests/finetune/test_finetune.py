"""`diffmix-ray finetune`: the training step in-process (fast), then one real Ray Train fit, as
fits cost ~15-30 s of start-up each: 2 DDP workers, rank 1 killed once mid-run (automatic resume,
step accounting, rank agreement, the bank it writes), then reruns of the same command against it
(no-op when finished, resume from the last checkpoint when the bank is missing)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from diffmix_ray import canonical
from diffmix_ray.contracts import CONCEPTS_JSON, DATASET_JSON, LEARNED_EMBEDS, LORA_WEIGHTS
from diffmix_ray.errors import DiffmixError
from diffmix_ray.finetune import run as ft_run
from diffmix_ray.finetune.config import FinetuneConfig
from diffmix_ray.finetune.data import decode_batch, image_key, local_batches, read_train, step_epochs
from diffmix_ray.finetune.loop import Finetuner, Progress, train
from diffmix_ray.finetune.sampling import StepSampler
from diffmix_ray.models import concepts as bank_io
from diffmix_ray.models.loader import load_pipeline

MAX_STEPS = 8
CLASS_TOKENS = ["<class_0>", "<class_1>", "<class_2>", "<class_3>"]


def _cfg(dataset: str, out: str, **kw) -> FinetuneConfig:
    base = dict(dataset=dataset, out=out, model="tiny", max_steps=MAX_STEPS, batch_size=2, checkpoint_every=3,
                log_every=2, lr=1e-2, ti_lr=5e-2, seed=0, cpus_per_worker=0.5)
    return FinetuneConfig(**(base | kw))


def _checkpoint(out: str, step: int) -> str:
    (run_dir,) = [d for d in os.listdir(os.path.join(out, "train")) if d.startswith("finetune-")]
    return os.path.join(out, "train", run_dir, f"checkpoint_step={step:08d}")


def _progress(out: str, step: int, rank: int) -> dict:
    with open(os.path.join(_checkpoint(out, step), f"progress-rank{rank}.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# In-process: the step, the loss, the embedding guard, the bank format (no Ray)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(sample_dataset, tmp_path_factory):
    """60 seeded steps with a high lr, run by the plain loop; lora_alpha = 2 x rank exercises the
    alpha folding of the bank export."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core machine
    torch.manual_seed(0)
    cfg = _cfg(sample_dataset, str(tmp_path_factory.mktemp("inproc") / "out"), max_steps=60, batch_size=4,
               lr=5e-2, ti_lr=5e-2, log_every=10, checkpoint_every=1000, rank=4, lora_alpha=8)
    inputs = ft_run.resolve_inputs(cfg)
    tuner = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
    probe = next(iter(next(local_batches(inputs.dataset, 64, 16, False, seed=123))))

    def probe_loss() -> float:  # fixed images, noise and timesteps: a noise-free loss to compare
        with torch.no_grad():
            return float(tuner.loss(probe, torch.Generator().manual_seed(7)))

    before = probe_loss()
    reports: list[dict] = []
    progress = train(tuner, local_batches(inputs.dataset, 64, 4, False, seed=0), Progress(),
                     lambda metrics, checkpoint: reports.append(metrics))
    yield dict(cfg=cfg, inputs=inputs, tuner=tuner, progress=progress, reports=reports, before=before,
               after=probe_loss())
    torch.set_num_threads(threads)


def test_loss_decreases_over_a_short_seeded_run(trained):
    losses = [r["loss"] for r in trained["reports"]]
    assert len(losses) == 6 and [r["step"] for r in trained["reports"]] == [10, 20, 30, 40, 50, 60]
    assert trained["after"] < trained["before"] - 0.03, (trained["before"], trained["after"])
    assert np.mean(losses[-2:]) < losses[0], losses


def test_only_the_class_token_vectors_change(trained):
    """The base vocabulary's embeddings stay bit-identical (weight decay included); every class
    token's vector moved away from its initialiser; the lookup serves both."""
    tuner = trained["tuner"]
    base, _ = load_pipeline("tiny")
    original = base.text_encoder.get_input_embeddings().weight
    lookup = tuner.class_tokens
    assert torch.equal(lookup.base.weight, original) and not lookup.base.weight.requires_grad
    vocab = original.shape[0]
    assert lookup.first_id == vocab and lookup.vectors.shape == (len(tuner.tokens), original.shape[1])
    assert [p for p in tuner.text_encoder.parameters() if p.requires_grad] == [lookup.vectors]
    initial = original[trained["inputs"].init_ids].mean(0)
    for row in lookup.vectors.detach():
        assert not torch.allclose(row, initial)
    ids = torch.tensor([[0, 5, vocab - 1, vocab, vocab + 3]])
    with torch.no_grad():
        looked_up = lookup(ids)[0]
    assert torch.equal(looked_up[:3], original[[0, 5, vocab - 1]])
    assert torch.equal(looked_up[3:], lookup.vectors.detach()[[0, 3]])


def test_bank_reproduces_the_trained_model(trained, tmp_path):
    """Checkpoint folder -> bank -> fresh pipeline: the same noise prediction as the trained modules."""
    tuner, inputs = trained["tuner"], trained["inputs"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tuner.save(str(folder), trained["progress"], rank=0)
    bank_inputs = dataclasses.replace(inputs, out=str(tmp_path / "bank"))
    bank_run = ft_run.write_bank(bank_inputs, str(folder))
    bank, local = bank_io.load_bank(str(tmp_path / "bank"))
    assert bank.mode == "ti+lora" and bank.tokens == inputs.tokens and bank.train_config["steps"] == 60
    assert bank == dataclasses.replace(bank_run, fingerprint=bank.fingerprint)
    pipe, _ = load_pipeline("tiny")
    bank_io.apply_bank(pipe, bank, local)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    ids = tuner.prompt_ids[torch.tensor([1, 3])]
    assert torch.equal(pipe.tokenizer(inputs.prompts[1:4:2], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        trained_pred = tuner.denoiser(latents, t, ids)
        loaded_pred = pipe.unet(latents, t, pipe.text_encoder(ids)[0]).sample
    torch.testing.assert_close(loaded_pred, trained_pred, rtol=1e-4, atol=1e-5)


def test_checkpoint_restores_the_exact_training_state(sample_dataset, tmp_path):
    """Save after 3 steps, load into a fresh Finetuner: the next step gives bit-identical weights,
    although the checkpoint keeps only the class-token rows of the embedding's Adam moments."""
    cfg = _cfg(sample_dataset, str(tmp_path / "out"), max_steps=3, checkpoint_every=1000, rank=2)
    inputs = ft_run.resolve_inputs(cfg)
    first = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
    epochs = local_batches(inputs.dataset, 64, 2, False, seed=0)
    progress = train(first, epochs, Progress(), lambda m, c: None)
    first.save(str(tmp_path), progress, rank=0)
    second = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
    restored = second.load(str(tmp_path), rank=0)
    assert restored.step == 3 and restored.resumed_at == [3] and second.param_digest() == first.param_digest()
    batch = next(iter(next(epochs)))
    for tuner in (first, second):
        torch.manual_seed(5)
        tuner.train_step(batch, 4)
    assert second.param_digest() == first.param_digest()


@pytest.mark.parametrize("mode", ["ti", "lora"])
def test_single_part_modes_write_banks_generate_loads(sample_dataset, tmp_path, mode):
    cfg = _cfg(sample_dataset, str(tmp_path / "bank"), mode=mode, max_steps=2, checkpoint_every=1000, rank=2)
    inputs = ft_run.resolve_inputs(cfg)
    tuner = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
    progress = train(tuner, local_batches(inputs.dataset, 64, 2, True, seed=0), Progress(), lambda m, c: None)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tuner.save(str(folder), progress, rank=0)
    ft_run.write_bank(inputs, str(folder))
    bank, local = bank_io.load_bank(cfg.out)
    assert os.path.exists(os.path.join(cfg.out, LORA_WEIGHTS)) == (mode == "lora")
    assert os.path.exists(os.path.join(cfg.out, LEARNED_EMBEDS)) == (mode == "ti")
    name = inputs.dataset.info.classes[1]
    assert bank.prompt(1) == (f"a photo of a {name} shape" if mode == "lora" else "a photo of a <class_1> shape")
    assert inputs.prompts[1] == bank.prompt(1)  # trained on the prompt generate will use
    pipe, _ = load_pipeline("tiny")
    bank_io.apply_bank(pipe, bank, local)
    assert ("<class_1>" in pipe.tokenizer.get_vocab()) == (mode == "ti")


# CUB-LT100 as the reference builds it: 29 -> 1 train images per class (1,242 in all)
CUB_LT100 = [int(30 * (1 / 100) ** (i / 198)) or 1 for i in range(200)]


def test_class_balanced_sampling_is_equal_in_expectation_and_deterministic():
    labels = np.repeat(np.arange(200), CUB_LT100)
    sampler = StepSampler(labels, 200, class_balanced=True, seed=42, batch_size=2, world=4)
    drawn = np.bincount(np.concatenate([labels[sampler.epoch_order(e)] for e in range(200)]), minlength=200)
    expected = 200 * len(labels) / 200  # every class N/C draws per epoch
    assert abs(drawn.mean() - expected) < 1e-9 and drawn.std() / expected < 0.05  # not 19-36 per class
    assert np.corrcoef(drawn, CUB_LT100)[0, 1] < 0.2  # the class size no longer decides how often it is seen
    again = StepSampler(labels, 200, class_balanced=True, seed=42, batch_size=2, world=4)
    other = StepSampler(labels, 200, class_balanced=True, seed=43, batch_size=2, world=4)
    steps = [1, 2, sampler.steps_per_epoch, sampler.steps_per_epoch + 1, 5000]
    assert all(np.array_equal(sampler.indices(s, r), again.indices(s, r)) for s in steps for r in range(4))
    assert not all(np.array_equal(sampler.indices(s, 0), other.indices(s, 0)) for s in steps)
    uniform = StepSampler(labels, 200, class_balanced=False, seed=42, batch_size=2, world=4)
    assert sorted(uniform.epoch_order(3)) == list(range(len(labels)))  # each image once per epoch
    # one step's global batch is cut into the ranks' slices, none shared
    assert np.array_equal(np.concatenate([sampler.indices(7, r) for r in range(4)]),
                          sampler.epoch_order(0)[6 * 8:7 * 8])


def test_a_resume_continues_with_exactly_the_batches_of_an_uninterrupted_run(sample_dataset):
    dataset = canonical.open_dataset(sample_dataset)
    table = read_train(dataset)
    sampler = StepSampler(table.column("label").to_numpy(), 4, True, seed=0, batch_size=4, world=2)

    def batches(first: int, count: int) -> list[dict]:
        out, epochs = [], step_epochs(table, sampler, 32, rank=1, first_step=first)
        while len(out) < count:
            out += [b for _, b in zip(range(count - len(out)), next(epochs))]
        return out

    straight = batches(1, 9)  # 3 steps per epoch: crosses two epoch boundaries
    resumed = batches(5, 5)  # a checkpoint at step 4, mid-epoch
    for a, b in zip(straight[4:], resumed):
        assert torch.equal(a["key"], b["key"]) and torch.equal(a["pixels"], b["pixels"])


def test_leakage_guard():
    batch = {"image_id": np.array(["v1"], dtype=object), "image": np.array([b"\xff"], dtype=object),
             "label": np.array([0]), "split": np.array(["val"], dtype=object)}
    with pytest.raises(DiffmixError, match=r"leakage guard: rows of split\(s\) \['val'\]"):
        decode_batch(batch, 64)


@pytest.fixture(scope="module")
def long_tail_dataset(sample_dataset, tmp_path_factory):
    from diffmix_ray.data.prepare import DeriveConfig, derive

    out = str(tmp_path_factory.mktemp("lt") / "lt")
    derive(DeriveConfig(parent=sample_dataset, imbalance_ratio=3), out)
    return out


def test_long_tail_datasets_default_to_class_balanced_fine_tuning(long_tail_dataset, sample_dataset, tmp_path,
                                                                    warnings_seen):
    lt = ft_run.resolve_inputs(_cfg(long_tail_dataset, str(tmp_path / "a")))
    assert lt.cfg.class_balanced is True and lt.identity["class_balanced"] is True
    assert "default for long-tailed datasets (imbalance ratio 3)" in lt.resolved["class_balanced"]["from"]
    spelled = ft_run.resolve_inputs(_cfg(long_tail_dataset, str(tmp_path / "a"), class_balanced=True))
    assert spelled.identity == lt.identity  # spelling out the default is the same run
    off = ft_run.resolve_inputs(_cfg(long_tail_dataset, str(tmp_path / "b"), class_balanced=False))
    assert off.cfg.class_balanced is False and off.resolved["class_balanced"]["from"] == "--no-class-balanced"
    plain = ft_run.resolve_inputs(_cfg(sample_dataset, str(tmp_path / "c")))
    assert plain.cfg.class_balanced is False and not warnings_seen
    ft_run.resolve_inputs(_cfg(sample_dataset, str(tmp_path / "c"), class_balanced=True))
    assert any("--class-balanced on" in w and "all have 6 train images" in w for w in warnings_seen)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each refused with a clear error before any worker starts
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_fit(monkeypatch):
    def fail(*_):
        pytest.fail("a training run started although the input is bad")

    monkeypatch.setattr(ft_run, "_fit", fail)


def _edited_dataset(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    info = canonical.open_dataset(dst).info
    edit(info)
    with open(os.path.join(dst, DATASET_JSON), "w", encoding="utf-8") as f:
        f.write(info.to_json())
    return dst


def _expect(cfg: FinetuneConfig, pattern: str, **kw) -> None:
    with pytest.raises(DiffmixError, match=pattern):
        ft_run.run_finetune(cfg, **kw)
    assert not os.path.exists(os.path.join(cfg.out, "train"))


def test_dataset_without_train_images_is_refused(sample_dataset, tmp_path, no_fit):
    def drop_train(info):
        info.counts.pop("train")
        info.files.pop("train")

    dataset = _edited_dataset(sample_dataset, str(tmp_path / "ds"), drop_train)
    _expect(_cfg(dataset, str(tmp_path / "out")), r"has no train images .*prepare the dataset with a train split")


def test_class_without_train_images_is_refused(sample_dataset, tmp_path, no_fit):
    dataset = _edited_dataset(sample_dataset, str(tmp_path / "ds"),
                              lambda info: info.counts["train"].update({"2": 0}))
    name = canonical.open_dataset(dataset).info.classes[2]
    _expect(_cfg(dataset, str(tmp_path / "out")), rf"class\(es\) 2 \({name}\) have no train images")


def test_model_folder_missing_a_component_is_refused(sample_dataset, tmp_path, no_fit):
    from diffmix_ray.models.presets import write_preset

    model = write_preset("tiny", str(tmp_path / "model"))
    shutil.rmtree(os.path.join(model, "vae"))
    _expect(_cfg(sample_dataset, str(tmp_path / "out"), model=model), r"missing vae/")


@pytest.mark.parametrize("change, pattern", [
    (dict(mode="dreambooth"), r"--mode 'dreambooth' is unknown; choose one of ti\+lora, ti, lora"),
    (dict(rank=0), r"--rank 0 must be a positive LoRA rank"),
    (dict(initializer_token="bird photo"), r"must be one word"),
    (dict(initializer_token="ktn"), r"--initializer-token 'ktn' is 3 tokens .* pick a word the tokenizer keeps whole"),
    (dict(prompt_template="a photo of a {super_class}"), r"lacks \{token\}"),
    (dict(batch_size=7, workers=4), r"gives each of 4 workers 6 train images, fewer than --batch-size 7"),
    (dict(precision="fp16", gpus_per_worker=0), r"precision fp16 needs GPUs"),
])
def test_bad_options_are_refused(sample_dataset, tmp_path, no_fit, change, pattern):
    _expect(_cfg(sample_dataset, str(tmp_path / "out"), **change), pattern)


def test_s3_output_without_credentials_is_refused(sample_dataset, tmp_path, s3_env, monkeypatch, no_fit):
    bucket = s3_env.make_bucket()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(DiffmixError, match=r"no AWS credentials found for s3://.*AWS_ACCESS_KEY_ID"):
        ft_run.run_finetune(_cfg(sample_dataset, f"{bucket}/bank"))


def test_resume_flag_needs_a_run_to_resume(sample_dataset, tmp_path, no_fit):
    _expect(_cfg(sample_dataset, str(tmp_path / "out")), r"--resume: .* holds no finetune run", resume=True)


def test_cli_reports_bad_options_without_a_traceback(sample_dataset, tmp_path):
    from typer.testing import CliRunner

    from diffmix_ray.cli import app

    result = CliRunner().invoke(app, ["finetune", "--dataset", sample_dataset, "--out", str(tmp_path / "o"),
                                      "--rank", "-1"])
    assert result.exit_code == 2 and "--rank -1 must be a positive LoRA rank" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Ray Train: one 2-worker DDP fit whose rank 1 dies once before step 5
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(ray_local, sample_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "bank")
    cfg = _cfg(sample_dataset, out, workers=2, max_failures=1, _fail_at_step=5)
    bank = ft_run.run_finetune(cfg)
    return cfg, bank, out


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint_without_repeating_steps(ddp_run):
    cfg, _, out = ddp_run
    assert os.path.exists(os.path.join(os.path.dirname(_checkpoint(out, MAX_STEPS)), "_fail_once"))  # it did die
    for rank in (0, 1):
        progress = _progress(out, MAX_STEPS, rank)
        assert progress["resumed_at"] == [3]  # restarted from the checkpoint at step 3, not from 0
        assert progress["step_ranges"] == [[1, MAX_STEPS]]  # every step exactly once, in order
        assert progress["images_seen"] == MAX_STEPS * cfg.batch_size


@pytest.mark.slow
def test_the_resumed_fit_saw_exactly_the_images_of_an_uninterrupted_one(ddp_run):
    """Rank 1 died before step 5 and the run resumed from step 3: each rank's record of the images it
    trained on, in order, is the one the step sampler gives for steps 1..8 without interruption."""
    import hashlib

    cfg, _, out = ddp_run
    table = read_train(canonical.open_dataset(cfg.dataset))
    ids = table.column("image_id").to_pylist()
    sampler = StepSampler(table.column("label").to_numpy(), 4, False, cfg.seed, cfg.batch_size, cfg.workers)
    for rank in (0, 1):
        digest = ""
        for step in range(1, MAX_STEPS + 1):
            keys = np.array([image_key(ids[i]) for i in sampler.indices(step, rank)], dtype=np.int64)
            digest = hashlib.sha256(digest.encode() + keys.tobytes()).hexdigest()
        assert _progress(out, MAX_STEPS, rank)["data_digest"] == digest


@pytest.mark.slow
def test_ddp_ranks_end_identical_while_seeing_different_data(ddp_run):
    _, _, out = ddp_run
    rank0, rank1 = _progress(out, MAX_STEPS, 0), _progress(out, MAX_STEPS, 1)
    assert rank0["param_digest"] == rank1["param_digest"]
    assert rank0["data_digest"] != rank1["data_digest"]


def _img2img(pipe, prompt: str) -> np.ndarray:
    from PIL import Image

    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return pipe(prompt=prompt, image=source, strength=0.8, num_inference_steps=5, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]


@pytest.mark.slow
def test_bank_from_a_fit_loads_with_generate_and_plain_diffusers(ddp_run, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import load_file

    from diffmix_ray.models.presets import write_preset

    _, written, out = ddp_run
    bank, local = bank_io.load_bank(out)
    assert bank.tokens == CLASS_TOKENS and bank.mode == "ti+lora"
    assert bank.base_model["fingerprint"] == load_pipeline("tiny")[1].fingerprint
    assert bank.dataset_fingerprint == canonical.open_dataset(written.train_config["dataset"]).info.fingerprint
    base, _ = load_pipeline("tiny")
    tuned, _ = load_pipeline("tiny")
    bank_io.apply_bank(tuned, bank, local)  # what generate does
    prompt0, prompt1 = bank.prompt(0), bank.prompt(1)
    assert np.abs(_img2img(tuned, prompt0) - _img2img(base, prompt0)).max() > 1e-3
    assert np.abs(_img2img(tuned, prompt0) - _img2img(tuned, prompt1)).max() > 1e-3

    plain = StableDiffusionImg2ImgPipeline.from_pretrained(write_preset("tiny", str(tmp_path / "model")),
                                                           safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    embeds = load_file(os.path.join(out, LEARNED_EMBEDS))
    plain.load_textual_inversion(list(embeds.values()), token=list(embeds.keys()))
    np.testing.assert_allclose(_img2img(plain, prompt1), _img2img(tuned, prompt1), atol=1e-5)


@pytest.mark.slow
def test_rerun_of_a_finished_run_is_a_noop_and_other_configs_are_refused(ddp_run, monkeypatch, no_fit):
    cfg, _, out = ddp_run
    before = os.path.getmtime(os.path.join(out, CONCEPTS_JSON))
    again = ft_run.run_finetune(dataclasses.replace(cfg, max_failures=3, log_every=4))  # execution knobs only
    assert again.tokens == CLASS_TOKENS
    assert os.path.getmtime(os.path.join(out, CONCEPTS_JSON)) == before
    with pytest.raises(DiffmixError, match=r"refusing to write into .*different config.*--overwrite"):
        ft_run.run_finetune(dataclasses.replace(cfg, lr=2e-2))


@pytest.mark.slow
def test_only_a_readable_record_of_finished_training_skips_the_fit(ddp_run, tmp_path):
    """A run whose record Ray Train cannot read (torn, or from another Ray) is resumed by a fit, which
    restores what it can; so is a run that has no record yet."""
    cfg, _, out = ddp_run
    copy = str(tmp_path / "bank")
    shutil.copytree(out, copy)
    inputs = ft_run.resolve_inputs(dataclasses.replace(cfg, out=copy))
    assert ft_run._finished_training(inputs).metrics["step"] == MAX_STEPS
    snapshot = glob.glob(os.path.join(copy, "train", "*", "checkpoint_manager_snapshot.json"))
    assert len(snapshot) == 1
    with open(snapshot[0], "w") as f:
        f.write("{torn")
    assert ft_run._finished_training(inputs) is None
    shutil.rmtree(os.path.join(copy, "train"))
    assert ft_run._finished_training(inputs) is None


@pytest.mark.slow
def test_rerun_after_an_interrupted_driver_resumes_from_the_last_checkpoint(ddp_run, monkeypatch):
    """The driver died after training, before the bank was written: the same command (here with
    --resume) finds the final checkpoint in Ray Train's record of the run and writes the same bank
    from it, with no fit (no worker group, no GPU node) and no step taken again."""
    cfg, _, out = ddp_run
    monkeypatch.setattr(ft_run, "_fit", lambda *_: pytest.fail("a fit started although training had finished"))
    written = {name: open(os.path.join(out, name), "rb").read() for name in (LORA_WEIGHTS, LEARNED_EMBEDS)}
    for name in (CONCEPTS_JSON, LORA_WEIGHTS, LEARNED_EMBEDS):
        os.remove(os.path.join(out, name))
    progress_before = _progress(out, MAX_STEPS, 0)
    bank = ft_run.run_finetune(cfg, resume=True)
    assert _progress(out, MAX_STEPS, 0) == progress_before  # no new step, no new checkpoint
    assert bank.train_config["steps"] == MAX_STEPS
    for name, data in written.items():
        assert open(os.path.join(out, name), "rb").read() == data
