"""The fine-tuning step and loop: plain torch, runnable in-process (tests) or inside a Ray Train
worker (`train_func`, the only function here that touches Ray).

What is trained (as diffusers' textual_inversion.py + train_dreambooth_lora.py, merged like the
Diff-Mix reference): one new token per class, whose vector lives in its own small parameter that
feeds the text encoder's token lookup (tokens.ClassTokenEmbedding; the base vocabulary's matrix
stays frozen), plus a peft LoRA on every UNet attention q/k/v/out projection. The UNet and text
encoder run inside one module (`Denoiser`), so under DDP the whole forward pass goes through the
wrapper and gradients sync.

The step never waits for the device: the loss stays on it until a report reads the window's mean,
and the image keys a rank saw are hashed into its progress record only when a report or checkpoint
needs it. (A float16 run's GradScaler still checks for inf each step: dynamic loss scaling needs it.)"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..errors import DiffmixError
from ..models.loader import load_pipeline
from ..models.safe_load import load_plain
from .config import LORA_TARGETS, FinetuneConfig
from .data import COL_KEY, COL_PIXELS
from .token_optim import RowAdamW
from .tokens import ClassTokenEmbedding, install_class_tokens

CKPT_WEIGHTS = "trainable.safetensors"  # "lora.<peft key>" and "embed.<token>" tensors, rank 0
# Optimizer state, grad scaler, step; rank 0. Param 0 is the class vectors (C x hidden): the layout the
# full-matrix path wrote too, after cutting its moments to the class-token rows, so old checkpoints load.
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_PROGRESS = "progress-rank{rank}.json"  # every rank: the steps it took, the data it saw
FAIL_DELAY_S = 3.0  # test hook only: see train_func.fail_once
HOLD_S = 120.0  # test hook only: see train_func.hold_once


def precision_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of frozen weights, autocast dtype or None). Trainable weights are always fp32. On a
    CPU only an explicit bf16 is honoured (the config refuses it for users; tests use it so dtype
    mismatches of the GPU paths surface without a GPU)."""
    if precision == "fp32" or (device.type != "cuda" and precision != "bf16"):
        return torch.float32, None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return dtype, dtype


class Denoiser(torch.nn.Module):
    """text -> UNet noise prediction in one forward, so DDP sees (and syncs) both halves."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy_latents, timesteps, input_ids):
        return self.unet(noisy_latents, timesteps, self.text_encoder(input_ids)[0]).sample


@dataclass
class Progress:
    """What a rank has done; saved into every checkpoint, so a resume continues the record."""

    step: int = 0
    step_ranges: list[list[int]] = field(default_factory=list)  # [[first, last], ...] of steps taken
    resumed_at: list[int] = field(default_factory=list)  # the step each resumed attempt started after
    images_seen: int = 0
    data_digest: str = ""  # running sha256 over the image keys seen, in order
    param_digest: str = ""  # sha256 of the trainable weights when saved (equal on all DDP ranks)

    def __post_init__(self) -> None:
        # Keys of the steps not yet in data_digest, still where the batch put them (the GPU under Ray):
        # copying them to the host every step would make every step wait for the device.
        self._pending: list[torch.Tensor] = []

    def add_step(self, step: int, keys: torch.Tensor) -> None:
        if self.step_ranges and self.step_ranges[-1][1] == step - 1:
            self.step_ranges[-1][1] = step
        else:
            self.step_ranges.append([step, step])
        self.step = step
        self.images_seen += len(keys)
        self._pending.append(keys.detach().clone())  # a copy: a loader may reuse the batch's buffers

    def flush(self) -> None:
        """Hash the pending steps' keys into data_digest, step by step as before (one running sha256
        per step, so records written before and after this change continue each other), with one
        device-to-host copy for all of them."""
        if not self._pending:
            return
        host = torch.cat(self._pending).cpu().numpy()
        start = 0
        for keys in self._pending:
            chunk = host[start:start + len(keys)]
            self.data_digest = hashlib.sha256(self.data_digest.encode() + chunk.tobytes()).hexdigest()
            start += len(keys)
        self._pending.clear()


class Finetuner:
    """The modules, optimizer and one training step. `wrap` (e.g. ray.train.torch.prepare_model)
    wraps the Denoiser for data-parallel training."""

    def __init__(self, cfg: FinetuneConfig, prompts: list[str], tokens: list[str], init_ids: list[int],
                 device: torch.device, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        self.cfg, self.device = cfg, device
        self.weight_dtype, self.autocast_dtype = precision_dtypes(cfg.precision, device)
        pipe, _ = load_pipeline(cfg.model, device=str(device), dtype=self.weight_dtype)
        self.tokenizer, self.text_encoder, self.unet, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
        self.tokens = tokens if cfg.has_tokens else []
        self.class_tokens: ClassTokenEmbedding | None = None
        if cfg.has_tokens:
            self.class_tokens = install_class_tokens(self.tokenizer, self.text_encoder, self.tokens, init_ids)
        if cfg.has_lora:
            from peft import LoraConfig

            torch.manual_seed(cfg.seed)  # the same LoRA init on every rank (DDP also broadcasts it)
            self.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                             target_modules=list(LORA_TARGETS)))
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        self.prompt_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids.to(device)
        for label, token in enumerate(self.tokens):
            if self.tokenizer.convert_tokens_to_ids(token) not in self.prompt_ids[label]:
                raise DiffmixError(f"the prompt of class {label} is longer than the tokenizer's "
                                   f"{self.tokenizer.model_max_length} tokens and loses its class token; "
                                   "shorten --prompt-template")
        if cfg.gradient_checkpointing:  # recompute the UNet's activations in backward: less memory, more compute
            self.unet.enable_gradient_checkpointing()
        if cfg.compile:
            # In place (nn.Module.compile), not torch.compile(unet): parameter names stay as they are, so
            # checkpoints, peft's LoRA state and the bank export see the same keys with or without it.
            self.unet.compile()
        denoiser = Denoiser(self.unet, self.text_encoder).train()
        self.denoiser = wrap(denoiser) if wrap else denoiser
        groups = []
        if self.class_tokens is not None:  # param index 0 in the optimizer state, as in old checkpoints
            groups.append({"params": [self.class_tokens.vectors], "lr": cfg.ti_lr})
        if cfg.has_lora:
            groups.append({"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": cfg.lr})
        self.params = [p for g in groups for p in g["params"]]
        self.per_class = cfg.token_schedule == "per-class"  # mode ti: the token group only (config.validate)
        optimizer = RowAdamW if self.per_class else torch.optim.AdamW
        self.optimizer = optimizer(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising loss on `batch` (uint8 pixels + labels): epsilon- or v-prediction MSE at
        random timesteps. A seeded `generator` (on this device) fixes latents, noise and timesteps:
        training passes one per step (step_generator), evaluation a fixed one."""
        device = self.device
        pixels = batch[COL_PIXELS].to(device, non_blocking=True).float() / 127.5 - 1.0
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.weight_dtype)).latent_dist.sample(generator)
            latents = latents.float() * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise DiffmixError(f"the base model's scheduler predicts {prediction_type!r}; finetune supports "
                               "epsilon and v_prediction")
        input_ids = self.prompt_ids[batch["label"].to(device, non_blocking=True)]
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self.denoiser(noisy, timesteps, input_ids)
        return F.mse_loss(pred.float(), target.float())

    def train_step(self, batch: dict, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One optimizer step on `batch`; `step` counts from 1 (it sets the warmup factor). Returns the
        loss as a detached tensor on the device: reading it (float()) waits for the step to finish.
        `generator` draws the step's latents, noise and timesteps (None: the global RNG)."""
        cfg = self.cfg
        warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * warm
        loss = self.loss(batch, generator)
        if self.per_class:  # only the batch's class token moves (every rank has the same class)
            self.optimizer.set_rows(batch["label"].to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    # -- checkpoints -----------------------------------------------------------------------------
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        out = {}
        if self.cfg.has_lora:
            out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.unet).items()})
        if self.class_tokens is not None:
            out.update({f"embed.{token}": row for token, row in zip(self.tokens, self.class_tokens.vectors)})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def weights_finite(self) -> bool:
        """Whether every trainable weight is finite (one read back from the device)."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())

    def param_digest(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.trainable_tensors().items()):
            h.update(name.encode() + tensor.numpy().tobytes())
        return h.hexdigest()

    def save(self, folder: str, progress: Progress, rank: int) -> None:
        from safetensors.torch import save_file

        progress.flush()
        progress.param_digest = self.param_digest()
        if rank == 0:
            save_file(self.trainable_tensors(), os.path.join(folder, CKPT_WEIGHTS))
            torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                        "step": progress.step}, os.path.join(folder, CKPT_OPTIMIZER))
        with open(os.path.join(folder, CKPT_PROGRESS.format(rank=rank)), "w", encoding="utf-8") as f:
            json.dump(asdict(progress), f)

    def load(self, folder: str, rank: int) -> Progress:
        from peft.utils import set_peft_model_state_dict

        lora, embeds, step = read_trained(folder)
        if self.cfg.has_lora and (unexpected := set_peft_model_state_dict(self.unet, lora).unexpected_keys):
            raise DiffmixError(f"the checkpoint in {folder} does not fit this LoRA (unexpected {unexpected[:3]})")
        saved = load_plain(os.path.join(folder, CKPT_OPTIMIZER), os.path.join(folder, CKPT_OPTIMIZER))
        if self.class_tokens is not None:
            vectors = self.class_tokens.vectors
            if missing := [t for t in self.tokens if t not in embeds]:
                raise DiffmixError(f"the checkpoint in {folder} lacks the embeddings of {missing[:3]}; it belongs "
                                   "to another run: start again with --overwrite")
            moments = saved["optimizer"]["state"].get(0, {}).get("exp_avg")
            if moments is not None and moments.shape != vectors.shape:
                raise DiffmixError(f"the checkpoint in {folder} holds token moments of shape {tuple(moments.shape)}, "
                                   f"not {tuple(vectors.shape)}; it belongs to another run: start again with "
                                   "--overwrite")
            with torch.no_grad():
                vectors.copy_(torch.stack([embeds[t] for t in self.tokens]))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        mine = os.path.join(folder, CKPT_PROGRESS.format(rank=rank))  # absent if the world grew
        with open(mine if os.path.exists(mine) else os.path.join(folder, CKPT_PROGRESS.format(rank=0))) as f:
            progress = Progress(**json.load(f))
        progress.resumed_at.append(step)
        return progress


def read_trained(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(LoRA state in peft keys, token -> embedding, step) from a checkpoint folder."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, CKPT_WEIGHTS))
    step = load_plain(os.path.join(folder, CKPT_OPTIMIZER), os.path.join(folder, CKPT_OPTIMIZER))["step"]
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    embeds = {k[len("embed."):]: v for k, v in tensors.items() if k.startswith("embed.")}
    return lora, embeds, int(step)


@dataclass
class PhaseTimes:
    """Seconds spent per phase, for the log line and the benchmark: waiting for data, the step
    itself (forward, backward, optimizer), and reporting (checkpoint writing and upload). On a GPU
    the steps are queued without waiting for them, so a step's time is mostly counted when the
    report waits for the window's last step (it goes to step_s) or when a full queue blocks."""

    first_batch_s: float = 0.0  # included in data_s: the wait while the data pipeline starts up
    data_s: float = 0.0
    step_s: float = 0.0
    report_s: float = 0.0


def mean_loss(losses: list[torch.Tensor]) -> float:
    """The mean of a window's per-step losses: one device-to-host copy, summed in float64 as the
    per-step floats were before."""
    return float(torch.stack(losses).cpu().double().mean())


class Diverged(DiffmixError):
    """The loss or the weights turned non-finite; every rank raises it at the same report."""


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one step's latents, noise and timesteps: a function of (seed, rank, step)
    only, so a resumed run draws exactly what an uninterrupted one drew at that step."""
    return torch.Generator(device=device).manual_seed(_noise_seed(seed, rank, step))


def _check_finite(tuner: Finetuner, loss: float, first: int, step: int, world_size: int) -> None:
    """Stop, on every rank together, when the window's loss or the weights are NaN or inf: a report
    or checkpoint of them would pass a broken run off as progress."""
    bad = not math.isfinite(loss) or not tuner.weights_finite()
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # one rank diverging first stops them all
            flag = torch.tensor([float(bad)], device=tuner.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
    if bad:
        cfg = tuner.cfg
        what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became NaN or inf"
        raise Diverged(f"step {step}: {what} (non-finite, within steps {first}-{step}): training diverged and is "
                       f"stopped; nothing from these steps is saved. Lower --lr ({cfg.lr:g}) / --ti-lr "
                       f"({cfg.ti_lr:g}) or raise warmup, then start again with --overwrite")


def train(tuner: Finetuner, epochs: Iterator[Iterable[dict]], progress: Progress,
          report: Callable[[dict, bool], None], world_size: int = 1,
          before_step: Callable[[int], None] | None = None, rank: int = 0) -> Progress:
    """Run steps progress.step+1 .. max_steps. `epochs` yields one iterable of full batches per
    epoch; `report(metrics, checkpoint)` runs every log_every and checkpoint_every steps and at
    the last step (the same steps on every rank: Ray's report is a barrier), after checking that
    the loss and weights are finite (Diverged otherwise). Between reports nothing here waits for the
    device. Each step draws from step_generator(seed, rank, step)."""
    cfg = tuner.cfg
    times = PhaseTimes()
    losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0
    while progress.step < cfg.max_steps:
        batches, took_any = iter(next(epochs)), False
        while progress.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            step = progress.step + 1
            if before_step is not None:
                before_step(step)
            losses.append(tuner.train_step(batch, step, step_generator(cfg.seed, rank, step, tuner.device)))
            progress.add_step(step, batch[COL_KEY])
            took_any, window_steps = True, window_steps + 1
            t2 = time.perf_counter()
            if not times.data_s:
                times.first_batch_s = t1 - t0
            times.data_s, times.step_s = times.data_s + t1 - t0, times.step_s + t2 - t1
            checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            if checkpoint or step % cfg.log_every == 0:
                loss = mean_loss(losses)  # waits for the window's queued steps: the window's only sync
                _check_finite(tuner, loss, step - window_steps + 1, step, world_size)
                progress.flush()
                t3 = time.perf_counter()
                times.step_s += t3 - t2
                elapsed = t3 - window_start
                metrics = {"step": step, "loss": loss,
                           "images_per_s": window_steps * cfg.batch_size * world_size / max(elapsed, 1e-9),
                           "steps_per_s": window_steps / max(elapsed, 1e-9),
                           "lr": tuner.optimizer.param_groups[-1]["lr"],
                           **{f"time_{k}": round(v, 4) for k, v in asdict(times).items()}}
                report(metrics, checkpoint)
                times.report_s += time.perf_counter() - t3
                losses, window_start, window_steps = [], time.perf_counter(), 0
        if not took_any:
            raise DiffmixError(f"an epoch gave this worker no full batch of {cfg.batch_size} images: the train "
                               "split is too small for --batch-size x --workers")
    progress.flush()
    return progress


def _noise_seed(seed: int, rank: int, step: int) -> int:
    """Different noise per rank and per step, reproducible from the config."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "little") >> 1


def train_func(config: dict) -> None:
    """Ray Train V2 per-worker entry point. `config` holds the FinetuneConfig ("cfg"), the class
    prompts and tokens, the initializer ids, the dataset (URI, class count), the model resolution,
    and the fail-once marker URI of the test hook."""
    import tempfile

    import ray.train
    import ray.train.torch

    from .. import canonical, storage
    from ..contracts import COL_LABEL
    from .data import read_train, step_epochs
    from .sampling import sampler_for

    cfg: FinetuneConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # = the CPUs Ray gave this worker
    tuner = Finetuner(cfg, config["prompts"], config["tokens"], config["init_ids"], device,
                      wrap=ray.train.torch.prepare_model)
    progress = Progress()
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            progress = tuner.load(folder, rank)
    # The steps draw from their own generators (step_generator); this seeds anything else that draws.
    torch.manual_seed(_noise_seed(cfg.seed, rank, progress.step))
    # Every rank reads the train split itself and takes its slice of each step's global batch from the
    # step sampler: a resume after step k continues with the images of step k+1, on every rank.
    table = read_train(canonical.open_dataset(config["dataset"]))
    sampler = sampler_for(table.column(COL_LABEL).to_numpy(), config["num_classes"], cfg.token_schedule,
                          cfg.class_balanced, cfg.seed, cfg.batch_size, world)
    epochs = step_epochs(table, sampler, config["resolution"], rank, first_step=progress.step + 1)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if rank == 0:  # Ray Train's worker logging: the job log and the dashboard show it
            logging.getLogger("diffmix_ray.finetune").info(
                "finetune step %d/%d loss %.4f %.2f images/s", metrics["step"], cfg.max_steps, metrics["loss"],
                metrics["images_per_s"])
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if with_checkpoint:
                tuner.save(folder, progress, rank)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved,
                             checkpoint_dir_name=f"checkpoint_step={metrics['step']:08d}" if saved else None)

    def fail_once(step: int) -> None:  # test hook: a worker dies mid-run, once
        marker = config.get("fail_marker")
        if cfg._fail_at_step == step and rank == min(1, world - 1) and marker and not storage.exists(marker):
            storage.write_text_atomic(marker, f"rank {rank} exited before step {step}\n")
            # Ray's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker that
            # dies sooner after a checkpoint takes its registration along and the run resumes from the one
            # before. Dying later makes the test's resume point known.
            time.sleep(FAIL_DELAY_S)
            os._exit(1)

    def hold_once(step: int) -> None:  # test hook: rank 0 waits for a test to kill its node, once
        marker = config.get("hold_marker")
        if cfg._hold_at_step == step and rank == 0 and marker and not storage.exists(marker):
            # The checkpoint before this step is reported: whenever the test sees Ray Train register it and
            # kills this node, the run has steps left to restore into (no race with the steps after it).
            storage.write_text_atomic(marker, f"rank {rank} held before step {step}\n")
            time.sleep(HOLD_S)

    def before_step(step: int) -> None:
        fail_once(step)
        hold_once(step)

    try:
        train(tuner, epochs, progress, report, world_size=world, before_step=before_step, rank=rank)
    except Diverged as e:  # every rank: end the run (no restart would help); the driver raises it
        if rank == 0:
            storage.write_text_atomic(config["diverged_marker"], str(e))
        ray.train.report({"step": progress.step})
