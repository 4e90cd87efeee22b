"""No number from a NaN: every numeric option is finite (one validator, in the shared config builder),
JSON is written valid (no `NaN`), a training run whose loss turns non-finite stops with the step and a
hint and is never marked complete; and the command line's own surprises: error text is never read as
markup, an empty --strength-set or a repeated seed is refused."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from typer.testing import CliRunner

from diffmix_ray import config as cfgmod
from diffmix_ray import storage
from diffmix_ray.cli import app
from diffmix_ray.errors import DiffmixError


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output  # stdout and stderr


BAD_NUMBERS = [
    ("generate", "--guidance", "nan"),
    ("generate", "--strength", "nan"),
    ("generate", "--multiplier", "inf"),
    ("generate", "--cpus-per-actor", "nan"),
    ("generate", "--strength-beta", "nan,1"),
    ("generate", "--strength-set", "0.5,inf"),
    ("train-cls", "--lr", "nan"),
    ("train-cls", "--lr", "inf"),
    ("train-cls", "--weight-decay", "nan"),
    ("train-cls", "--cpus-per-worker", "nan"),
    ("finetune", "--ti-lr", "inf"),
    ("finetune", "--lr", "-inf"),
    ("prepare-from", "--imbalance-ratio", "nan"),
    ("score", "--cpus-per-actor", "nan"),
]


@pytest.mark.parametrize("command, flag, value", BAD_NUMBERS)
def test_non_finite_options_are_refused_before_any_work(command, flag, value, sample_dataset, tmp_path):
    out = str(tmp_path / "out")
    base = {"generate": ["generate", "--dataset", sample_dataset, "--mode", "real-mix", "--out", out],
            "train-cls": ["train-cls", "--dataset", sample_dataset, "--arch", "test_resnet", "--out", out],
            "finetune": ["finetune", "--dataset", sample_dataset, "--out", out],
            "prepare-from": ["prepare", "--from", sample_dataset, "--out", out],
            "score": ["score", "--synthetic", str(tmp_path / "syn"), "--clip", "tiny"]}[command]
    code, text = _run(*base, flag, value)
    assert code == 2, text
    assert f"{flag} {value}" in text and "finite" in text, text
    assert not os.path.exists(out) and "Traceback" not in text


def test_yaml_nan_is_refused_too(sample_dataset, tmp_path):
    from diffmix_ray.generate.config import GenerateConfig

    config = tmp_path / "g.yaml"
    config.write_text("guidance: .nan\nstrength_set: [0.3, .inf]\n")
    with pytest.raises(DiffmixError, match=r"guidance nan .*finite"):
        cfgmod.build(GenerateConfig, str(config), {"dataset": sample_dataset})


def test_the_validator_covers_every_numeric_field():
    @dataclasses.dataclass(frozen=True)
    class Some:
        a: int = 1
        b: float = 0.5
        c: tuple[float, ...] | None = None
        d: str = "nan"  # a string is not a number

    assert cfgmod.build(Some, None, {"c": (1.0, 2.0)}).c == (1.0, 2.0)
    for flags, flag in (({"b": float("nan")}, "--b nan"), ({"c": (1.0, float("-inf"))}, "--c 1.0,-inf")):
        with pytest.raises(DiffmixError, match=flag):
            cfgmod.build(Some, None, flags)


def test_json_is_written_valid_or_not_at_all(tmp_path):
    uri = str(tmp_path / "run.json")
    with pytest.raises(DiffmixError, match=r"run\.json.*non-finite.*config\.guidance"):
        storage.write_json_atomic(uri, {"config": {"guidance": float("nan")}})
    assert not os.path.exists(uri)


def test_a_finetune_whose_loss_turns_non_finite_stops_with_the_step(sample_dataset):
    from diffmix_ray.finetune import run as ft_run
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.finetune.data import local_batches
    from diffmix_ray.finetune.loop import Finetuner, Progress, train

    cfg = FinetuneConfig(dataset=sample_dataset, out="unused", model="tiny", max_steps=6, batch_size=2,
                         checkpoint_every=3, log_every=3, ti_lr=1e30, lr=1e30, seed=0, rank=2)
    inputs = ft_run.resolve_inputs(cfg)
    torch.set_num_threads(1)
    tuner = Finetuner(cfg, inputs.prompts, inputs.tokens, inputs.init_ids, torch.device("cpu"))
    saved = []
    with pytest.raises(DiffmixError, match=r"step [1-3]: .*(loss|weights).* (nan|inf|non-finite).*--ti-lr|--lr"):
        train(tuner, local_batches(inputs.dataset, 64, 2, False, seed=0), Progress(),
              lambda m, checkpoint: saved.append(m["step"]))
    assert saved == []  # no report, no checkpoint of broken weights


def test_classifier_loss_check_names_the_epoch():
    from diffmix_ray.classify.step import check_finite_loss

    check_finite_loss(0.5, epoch=0, first_step=0, steps=10)
    with pytest.raises(DiffmixError, match=r"epoch 3 \(steps 31-40\).*nan.*Lower --lr"):
        check_finite_loss(float("nan"), epoch=3, first_step=30, steps=10)


def test_a_diverging_classifier_run_stops_and_is_never_complete(ray_local, sample_dataset, tmp_path):
    """Through Ray Train: the loop stops every rank at the epoch whose loss is non-finite; the driver
    raises its message; no metrics.json, no best/, no _SUCCESS."""
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_classify

    out = tmp_path / "cls"
    cfg = ClassifyConfig(dataset=sample_dataset, arch="test_resnet", out=str(out), img_size=32, epochs=2,
                         batch_size=4, lr=1e30, optimizer="sgd", warmup_epochs=0.0, select="last",
                         cpus_per_worker=1.0, seed=0)
    with pytest.raises(DiffmixError, match=r"epoch 0 \(steps 1-\d+\): the training loss became (nan|inf)"):
        run_classify(cfg)
    assert not (out / "_SUCCESS").exists() and not (out / "metrics.json").exists()
    assert not (out / "best").exists()


def test_a_bank_with_non_finite_weights_is_never_written(tmp_path, sample_dataset):
    from diffmix_ray.models.concepts import check_finite

    check_finite({"a": torch.ones(2)}, "bank")
    with pytest.raises(DiffmixError, match=r"bank: .*'b'.*non-finite"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "bank")


# ---------------------------------------------------------------------------------------------
# Console text, empty lists, repeated seeds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["raw/photos[/2024]", "raw/[red]photos", "raw/[bold]x[/bold]"])
def test_error_text_is_never_read_as_markup(tmp_path, source):
    code, text = _run("prepare", "--format", "imagefolder", "--source", str(tmp_path / source), "--super-class", "x",
                      "--out", str(tmp_path / "out"))
    assert code == 2 and "MarkupError" not in text, text
    assert source in " ".join(text.split()).replace(" /", "/") or source in text.replace("\n", ""), text


def test_an_empty_strength_set_is_refused(sample_dataset, tmp_path):
    code, text = _run("generate", "--dataset", sample_dataset, "--mode", "real-mix", "--out", str(tmp_path / "o"),
                      "--strength-set", ",,")
    assert code == 2 and "--strength-set" in text and "no number" in text, text


def test_repeated_seeds_are_refused(sample_dataset, tmp_path):
    for seeds, why in (("1,1", "twice"), ("1,,x", "whole numbers")):
        code, text = _run("train-cls", "--dataset", sample_dataset, "--arch", "test_resnet", "--out",
                          str(tmp_path / "o"), "--seeds", seeds)
        assert code == 2 and "--seeds" in text and why in text, text
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.classify.run import run_seeds

    with pytest.raises(DiffmixError, match="seed 3 twice"):
        run_seeds(ClassifyConfig(dataset=sample_dataset, arch="test_resnet", out=str(tmp_path / "o")), [3, 4, 3])
