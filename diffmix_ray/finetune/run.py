"""The `finetune` driver: validate every input -> claim <out> -> TorchTrainer.fit -> concept bank.
Only this module (and loop.train_func) knows about Ray Train.

Layout of <out>: `_run.json` (written first: which config owns this output), `train/<run name>/`
(Ray Train's run folder with its checkpoints; the run name is a hash of the config, so rerunning
the same command finds it and Ray resumes from its latest checkpoint) and the concept bank at the
root, `concepts.json` written last."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from rich.markup import escape

from .. import canonical, lease, storage
from ..console import console, logger
from ..contracts import CONCEPTS_JSON, DIVERGED, RUN_JSON
from ..errors import DiffmixError
from ..models import concepts as bank_io
from ..models.loader import ModelRef, resolve_model
from ..runtime.jobs import announce
from ..runtime.local_ray import init_ray, resolve_gpus
from ..runtime.shared_paths import check_shared_paths
from .config import DEFAULT_INITIALIZER, FinetuneConfig
from .data import epoch_rows

TRAIN_DIR = "train"
FAIL_MARKER = "_fail_once"  # test hook (FinetuneConfig._fail_at_step): fires once per run folder
HOLD_MARKER = "_held_once"  # test hook (FinetuneConfig._hold_at_step): fires once per run folder


@dataclass(frozen=True)
class Inputs:
    """Everything the driver resolved before any worker starts."""

    cfg: FinetuneConfig
    out: str
    dataset: canonical.Dataset
    model: ModelRef
    tokens: list[str]
    prompts: list[str]
    init_ids: list[int]
    initializer: str  # how the class tokens were initialised, for the bank's train_config
    identity: dict
    run_name: str
    resolved: dict  # option -> {"value", "from"}: defaults decided from the dataset, for the bank


def load_tokenizer(model: ModelRef):
    """Only the tokenizer: enough to check the initializer and the prompts on the driver."""
    if model.kind == "preset":
        from ..models.loader import parse_preset
        from ..models.presets import preset_tokenizer

        return preset_tokenizer(parse_preset(model.spec)[0])
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.path.join(model.local_path, "tokenizer"), local_files_only=True)


def initializer_ids(tokenizer, word: str | None) -> tuple[list[int], str]:
    """Ids whose mean embedding starts every class token, and how they were chosen. An explicit
    word must be one token; the default "ktn" falls back to the mean of its pieces when the
    tokenizer splits it (the built-in presets' byte-level tokenizer does)."""
    chosen = word or DEFAULT_INITIALIZER
    ids = tokenizer.encode(chosen, add_special_tokens=False)
    if len(ids) == 1:
        return ids, f"{chosen!r} (one token)"
    if word is not None:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DiffmixError(f"--initializer-token {word!r} is {len(ids)} tokens for this model's tokenizer {pieces}; "
                           "each class token starts from ONE existing token: pick a word the tokenizer keeps "
                           f"whole, or omit the flag for the default {DEFAULT_INITIALIZER!r}")
    return ids, f"mean of the {len(ids)} pieces of {chosen!r}"


def _check_dataset(cfg: FinetuneConfig, dataset: canonical.Dataset) -> None:
    info = dataset.info
    counts = info.class_counts("train")
    if not info.files.get("train") or sum(counts) == 0:
        raise DiffmixError(f"{dataset.uri} has no train images (splits: {sorted(info.counts) or 'none'}); finetune "
                           "learns from the train split only: prepare the dataset with a train split")
    if empty := [f"{c} ({info.classes[c]})" for c, n in enumerate(counts) if n == 0]:
        raise DiffmixError(f"{dataset.uri}: class(es) {', '.join(empty[:5])} have no train images, so their tokens "
                           "could not be learned; prepare the dataset so every class has train images")
    per_worker = epoch_rows(counts) // cfg.workers
    if per_worker < cfg.batch_size:
        raise DiffmixError(f"an epoch of {dataset.uri} gives each of {cfg.workers} workers {per_worker} train images, "
                           f"fewer than --batch-size {cfg.batch_size}; lower --batch-size or --workers")


def resolve_class_balanced(cfg: FinetuneConfig, info) -> tuple[bool, str]:
    """(class-balanced sampling or not, why): the user's choice, else the paper's for the dataset."""
    counts = info.class_counts("train")
    if cfg.token_schedule == "per-class":
        return False, "token_schedule per-class: every step trains one class, every class the same steps"
    if cfg.class_balanced is not None:
        if cfg.class_balanced and counts and min(counts) == max(counts):
            logger.warning("--class-balanced on %s, whose classes all have %d train images: the weights 1/n_c are "
                           "equal, so it only draws with replacement instead of showing each image once per epoch "
                           "(--no-class-balanced, the default for a balanced dataset)", info.name, counts[0])
        return cfg.class_balanced, "--class-balanced" if cfg.class_balanced else "--no-class-balanced"
    if info.subset.get("kind") == "long-tail":
        return True, (f"default for long-tailed datasets (imbalance ratio {info.subset.get('imbalance_ratio'):g}): "
                      "the paper's class-balanced fine-tuning, p ∝ 1/n_c; --no-class-balanced to turn it off")
    return False, "default (not a long-tailed dataset)"


def resolve_inputs(cfg: FinetuneConfig) -> Inputs:
    """Validate the config, dataset, model and output location; raise DiffmixError on any problem.
    Options left to the dataset (class_balanced) are resolved into the returned config, so spelling
    out a default is the same run as leaving it out."""
    cfg.validate()
    if not cfg.out:
        raise DiffmixError("--out is required: where the concept bank (and the training checkpoints) go")
    out = storage.normalize(cfg.out)
    storage.check_bucket(out)
    dataset = canonical.open_dataset(cfg.dataset)
    _check_dataset(cfg, dataset)
    balanced, balanced_from = resolve_class_balanced(cfg, dataset.info)
    cfg = dataclasses.replace(cfg, class_balanced=balanced)
    model = resolve_model(cfg.model)
    tokens = cfg.tokens(dataset.info.num_classes)
    init_ids, initializer = [], "none (mode lora trains no tokens)"
    if cfg.has_tokens:
        tokenizer = load_tokenizer(model)
        if clash := [t for t in tokens if t in tokenizer.get_vocab()]:
            raise DiffmixError(f"the tokenizer of {model.spec} already has tokens {clash[:3]}; fine-tune from the "
                               "base model, not from a model that already holds a concept bank")
        init_ids, initializer = initializer_ids(tokenizer, cfg.initializer_token)
    identity = cfg.identity() | {"dataset": dataset.uri, "dataset_fingerprint": dataset.info.fingerprint,
                                 "model_fingerprint": model.fingerprint}
    prompts = cfg.prompts(dataset.info.classes, dataset.info.super_class)
    return Inputs(cfg, out, dataset, model, tokens, prompts, init_ids, initializer, identity,
                  f"finetune-{storage.config_hash(identity)}",
                  {"class_balanced": {"value": balanced, "from": balanced_from}})


def _claim(inputs: Inputs, overwrite: bool, resume: bool) -> bool:
    """True when <out> holds this very run (resume). --resume insists on that."""
    if resume and not overwrite:
        run_uri = storage.join(inputs.out, RUN_JSON)
        have = storage.read_json(run_uri) if storage.exists(run_uri) else None
        if have is None or have.get("config_hash") != storage.config_hash(inputs.identity):
            why = "holds no finetune run" if have is None else "holds a run with a different config"
            raise DiffmixError(f"--resume: {inputs.out} {why}; rerun the original command unchanged, or drop "
                               "--resume to start a new run")
    return storage.claim_output(inputs.out, "finetune", inputs.identity, overwrite,
                                inputs={"--dataset": inputs.dataset.uri, "--model": inputs.model.location})


def _fit(inputs: Inputs):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from .loop import train_func

    init_ray(min_cpus=inputs.cfg.workers * inputs.cfg.cpus_per_worker)
    cfg = dataclasses.replace(inputs.cfg, gpus_per_worker=resolve_gpus(inputs.cfg.gpus_per_worker, "finetune", "worker"))
    cfg.validate()  # again, now that the GPU count is known (fp16/bf16 need GPUs)
    check_shared_paths("finetune", [("--dataset", inputs.dataset.uri), ("--model", cfg.model)], inputs.out)
    train_uri = storage.join(inputs.out, TRAIN_DIR)
    storage.makedirs(train_uri)
    filesystem, path = storage.arrow_filesystem(train_uri) if storage.is_s3(train_uri) else (None, train_uri)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg, "prompts": inputs.prompts, "tokens": inputs.tokens, "init_ids": inputs.init_ids,
                           "dataset": inputs.dataset.uri, "num_classes": inputs.dataset.info.num_classes,
                           "resolution": inputs.model.resolution,
                           "fail_marker": storage.join(train_uri, inputs.run_name, FAIL_MARKER),
                           "hold_marker": storage.join(train_uri, inputs.run_name, HOLD_MARKER),
                           "diverged_marker": storage.join(inputs.out, DIVERGED)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=inputs.run_name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
    )
    storage.remove_tree(storage.join(inputs.out, DIVERGED))  # an earlier attempt's: this one decides again
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise DiffmixError(f"fine-tuning failed ({cfg.max_failures} restarts allowed): {e}\nRerun the same command "
                           "to resume from the last checkpoint") from e


def _finished_training(inputs: Inputs):
    """Ray Train's result of this run when its training already reached --max-steps (the driver died
    after the last checkpoint, before the bank was written), else None. The bank is then written from
    that checkpoint with no worker group: no GPU node has to start only to write a file."""
    from ray.train import Result

    run_uri = storage.join(inputs.out, TRAIN_DIR, inputs.run_name)
    if not storage.exists(run_uri):
        return None
    filesystem, path = storage.arrow_filesystem(run_uri)
    try:
        result = Result.from_path(path, storage_filesystem=filesystem)
    except Exception as e:  # noqa: BLE001 - no snapshot yet, or one this Ray cannot read: the fit restores
        logger.info("finetune: %s has no finished training to write a bank from (%s); resuming the fit", run_uri, e)
        return None
    finished = result.checkpoint is not None and (result.metrics or {}).get("step") == inputs.cfg.max_steps
    return result if finished else None


def bank_weights(lora_peft: dict, embeds: dict, cfg: FinetuneConfig) -> tuple[dict | None, dict | None]:
    """Checkpoint tensors -> what save_bank takes: LoRA in diffusers' key format, with the
    alpha/rank scale folded into the up weights (diffusers loads a LoRA without alphas at scale 1)."""
    lora = None
    if cfg.has_lora:
        from diffusers.utils import convert_state_dict_to_diffusers

        scale = cfg.alpha / cfg.rank
        lora = convert_state_dict_to_diffusers({k: (v * scale if "lora_B" in k else v) for k, v in lora_peft.items()})
    return lora, (embeds if cfg.has_tokens else None)


def write_bank(inputs: Inputs, checkpoint_dir: str, extra: dict | None = None) -> bank_io.ConceptBank:
    from .loop import read_trained

    cfg, info = inputs.cfg, inputs.dataset.info
    lora_peft, embeds, step = read_trained(checkpoint_dir)
    if step != cfg.max_steps:
        raise DiffmixError(f"the latest checkpoint is at step {step}, not --max-steps {cfg.max_steps}; rerun the same "
                           "command to finish training")
    lora, tokens = bank_weights(lora_peft, embeds, cfg)
    bank = bank_io.ConceptBank(
        tokens=inputs.tokens, class_names=list(info.classes), prompt_template=cfg.prompt_template,
        super_class=info.super_class, mode=cfg.mode,
        base_model={"spec": inputs.model.spec, "fingerprint": inputs.model.fingerprint},
        dataset_fingerprint=info.fingerprint,
        train_config=dataclasses.asdict(cfg) | {"out": inputs.out, "dataset": inputs.dataset.uri,
                                                "initializer": inputs.initializer, "run_name": inputs.run_name,
                                                "steps": step, "resolved": inputs.resolved,
                                                "sampling": _sampler(inputs).describe()} | (extra or {}))
    bank_io.save_bank(inputs.out, bank, lora, tokens)
    return bank


def _sampler(inputs: Inputs):
    from .sampling import sampler_for

    info, cfg = inputs.dataset.info, inputs.cfg
    labels = [c for c, n in enumerate(info.class_counts("train")) for _ in range(n)]
    return sampler_for(labels, info.num_classes, cfg.token_schedule, cfg.class_balanced, cfg.seed, cfg.batch_size,
                       cfg.workers)


@lease.scoped  # the output has one writer while this runs, and none after
def run_finetune(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> bank_io.ConceptBank:
    """Fine-tune (or resume, or find already finished) and return the concept bank at cfg.out."""
    started = time.perf_counter()
    inputs = resolve_inputs(cfg)
    cfg = inputs.cfg
    resumed = _claim(inputs, overwrite, resume)
    announce("finetune", storage.config_hash(inputs.identity))  # inside a Ray job: where to watch it
    if resumed and storage.exists(storage.join(inputs.out, CONCEPTS_JSON)):
        console.print(f"{inputs.out} already holds the finished concept bank of this config; nothing to do")
        return bank_io.load_bank(inputs.out)[0]
    console.print(f"finetune {cfg.mode}: {inputs.dataset.info.num_classes} classes, "
                  f"{inputs.dataset.info.split_size('train')} train images, {cfg.max_steps} steps x {cfg.batch_size} "
                  f"x {cfg.workers} worker(s); run {inputs.run_name}" + (" (resuming)" if resumed else ""))
    console.print(f"sampling: {_sampler(inputs).describe()} ({inputs.resolved['class_balanced']['from']})",
                  highlight=False)
    result = _finished_training(inputs) if resumed else None
    if result is not None:
        console.print(f"training already reached step {cfg.max_steps}: writing the concept bank from its last "
                      "checkpoint")
    else:
        result = _fit(inputs)
    if storage.exists(diverged := storage.join(inputs.out, DIVERGED)):  # stopped by the loop, no bank
        raise DiffmixError(storage.read_text(diverged))
    if result.checkpoint is None:
        raise DiffmixError(f"training at {inputs.out} ended without a checkpoint; rerun the same command")
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as folder:
        bank = write_bank(inputs, folder, {"final_metrics": metrics, "checkpoint": result.checkpoint.path})
    console.print(f"[green]concept bank written to {escape(inputs.out)}[/green] ({cfg.max_steps} steps, "
                  f"{time.perf_counter() - started:.1f} s this run)", markup=True)
    return bank
