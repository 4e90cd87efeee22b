"""Train the `sample` models from scratch on the sample world (sample_world.py), on a CPU, seeded.

Three phases, as Stable Diffusion and CLIP were made, at toy sizes:
  1. the VAE (AutoencoderKL, x4: 32 px images <-> 8x8x4 latents) learns to reconstruct the world's
     images (L1 + a small KL term); its scaling factor is then set to 1/std of the latents, as SD's
     0.18215 was;
  2. the UNet (UNet2DConditionModel) and the text encoder (CLIPTextModel, trained jointly from
     scratch) learn to denoise those latents under SD 1.5's noise schedule, conditioned on captions
     like "a photo of a red circle shape" (and a few rewordings), with 15% empty captions so
     classifier-free guidance works; the saved weights are an exponential moving average;
  3. a CLIPModel learns contrastively to match the world's images to the class prompts `score`
     uses, and to the two object prompts (images with a shape vs the bare backgrounds).

Everything is drawn from one seed; torch runs on a fixed number of threads, so a rerun with the
same seed, threads and library versions writes the same files. The folders are written as SD 1.5's
and CLIP's are (save_pretrained of the same classes), weights in float16, each with its training
record (sample.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
import torch.nn.functional as F

from .. import sample_world as world
from ..console import console
from ..errors import DiffmixError
from . import sample as sample_io
from .presets import MAX_PROMPT_TOKENS, PROMPT_WORDS, SD15_SCHEDULER, build_tokenizer

RESOLUTION = 32
INITIALIZER_WORDS = ("ktn",)  # finetune's default class-token initializer: one token here too
WORDS = PROMPT_WORDS + world.WORDS + INITIALIZER_WORDS
VERSIONED = ("diffmix-ray", "torch", "diffusers", "transformers", "numpy", "pillow", "safetensors")

# Sizes (the only place they are set). UNet 8x8 latents -> 4x4 -> mid; cross-attention at both levels.
VAE = dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            # diffusers' name for the number of heads (8 in SD 1.5); 2 heads of 16 and 32 channels here: heads
            # of 4-8 channels made attention a third of the step's time on a CPU
            attention_head_dim=2, norm_num_groups=16)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=4)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CLIP_PROJECTION = 64


@dataclass(frozen=True)
class TrainSampleConfig:
    seed: int = 0
    images_per_class: int = 600  # the drawn training pool (the world is infinite; this is what the models see)
    backgrounds: int = 600  # shape-less images: CLIP's "a photo without a shape on it"
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4  # weight of the KL term (per latent element) against L1 (per pixel)
    unet_steps: int = 7000
    # Spread of the scaled latents: 1 is SD's choice for 64x64 latents. An 8x8 latent loses its content to the
    # same noise at a lower step (there are 64x fewer values to average the noise away), so its signal is
    # raised: img2img strength then means what it means on SD (0.2 keeps the source, 0.9 reaches the target).
    latent_std: float = 2.5
    unet_batch: int = 64
    unet_lr: float = 1e-3  # UNet and text encoder
    min_snr: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): min(SNR, 5)/SNR per sample, faster convergence
    uncond_prob: float = 0.15  # empty captions: the unconditional half of classifier-free guidance
    ema_decay: float = 0.999
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 1e-3
    warmup_steps: int = 100
    # torch threads: part of what makes a rerun bit-identical. One: these models' ops are too small for an
    # OpenMP team to pay off on a shared machine (measured: 2 threads 7x slower per step at load 4)
    threads: int = 1
    log_every: int = 100

    def validate(self) -> None:
        ints = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, int) and k != "seed"}
        if bad := [k for k, v in ints.items() if v < (0 if k == "backgrounds" else 1)]:
            raise DiffmixError(f"train-sample: {', '.join(bad)} must be >= 1")
        if not 0 <= self.uncond_prob < 1 or not 0 < self.ema_decay < 1:
            raise DiffmixError("train-sample: uncond_prob must be in [0, 1) and ema_decay in (0, 1)")


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------
@dataclass
class Pool:
    images: torch.Tensor  # uint8 (N, 3, R, R): class images first, then backgrounds
    labels: torch.Tensor  # int64 (N,): class, or -1 for a background

    @property
    def shapes(self) -> torch.Tensor:
        return torch.nonzero(self.labels >= 0).squeeze(1)


def draw_pool(cfg: TrainSampleConfig) -> Pool:
    """The training images: `images_per_class` of every class and `backgrounds` bare ones, each from its own
    seeded generator (so the pool does not depend on the order they are drawn in)."""
    images, labels = [], []
    for c in range(len(world.CLASSES)):
        rng = np.random.default_rng([cfg.seed, 1, c])
        for _ in range(cfg.images_per_class):
            images.append(np.asarray(world.draw_class(c, rng, RESOLUTION)))
            labels.append(c)
    rng = np.random.default_rng([cfg.seed, 2])
    for _ in range(cfg.backgrounds):
        images.append(np.asarray(world.draw(str(rng.choice(list(world.COLOURS))), None, rng, RESOLUTION)))
        labels.append(-1)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Pool(pixels, torch.tensor(labels, dtype=torch.int64))


def caption_variants(label: int) -> list[str]:
    """The captions a class is trained with: the prompt template the project uses everywhere first, then
    rewordings that keep the words' meaning apart from their position."""
    name = world.CLASS_NAMES[label]
    return [world.caption(label), f"a photo of a {name}", f"a {name}", f"a {name} {world.SUPER_CLASS}",
            f"a picture of a {name} {world.SUPER_CLASS}"]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (the world is symmetric under it)."""
    which = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(which.view(-1, 1, 1, 1), x.flip(-1), x)


# -------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------
def sample_tokenizer():
    return build_tokenizer(words=WORDS)


def new_vae():
    from diffusers import AutoencoderKL

    n = len(VAE["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, sample_size=RESOLUTION, **VAE)


def new_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_PROMPT_TOKENS,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT["hidden_size"],
                                        **TEXT))


def new_unet():
    from diffusers import UNet2DConditionModel

    factor = 2 ** (len(VAE["block_out_channels"]) - 1)
    return UNet2DConditionModel(sample_size=RESOLUTION // factor, in_channels=VAE["latent_channels"],
                                out_channels=VAE["latent_channels"], cross_attention_dim=TEXT["hidden_size"], **UNET)


def new_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), max_position_embeddings=MAX_PROMPT_TOKENS, projection_dim=CLIP_PROJECTION,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **CLIP_TEXT)
    vision = dict(image_size=RESOLUTION, projection_dim=CLIP_PROJECTION, **CLIP_VISION)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_PROJECTION,
                                logit_scale_init_value=2.6592))


class Schedule:
    """Linear warm-up, then cosine decay to a tenth of the peak."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, warmup: int):
        self.optimizer, self.steps, self.warmup = optimizer, steps, min(warmup, max(1, steps // 10))
        self.peaks = [g["lr"] for g in optimizer.param_groups]

    def set(self, step: int) -> None:
        if step <= self.warmup:
            f = step / self.warmup
        else:
            f = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.steps - self.warmup)))
        for g, peak in zip(self.optimizer.param_groups, self.peaks):
            g["lr"] = peak * f


class Ema:
    """An exponential moving average of parameters, with the usual warm-up of its decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


class Phase:
    """Progress and timing of one training phase: prints every `log_every` steps, keeps the loss history."""

    def __init__(self, name: str, steps: int, log_every: int):
        self.name, self.steps, self.log_every = name, steps, log_every
        self.losses: list[float] = []
        self.started = time.perf_counter()
        self._window = time.perf_counter()
        self._cpu = self._cpu_start = time.process_time()

    def step(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if step % self.log_every == 0 or step == self.steps:
            now, cpu = time.perf_counter(), time.process_time()
            n = (step - 1) % self.log_every + 1
            # CPU seconds beside wall seconds: on a shared machine the first says what the step costs
            console.print(f"{self.name} step {step}/{self.steps} loss {np.mean(self.losses[-n:]):.4f} "
                          f"({(now - self._window) / n:.3f} s/step, {(cpu - self._cpu) / n:.3f} CPU s/step, "
                          f"load {_load():.1f})", highlight=False)
            self._window, self._cpu = now, cpu

    def summary(self) -> dict:
        tail = self.losses[-min(100, len(self.losses)):]
        seconds = time.perf_counter() - self.started
        cpu = time.process_time() - self._cpu_start
        return {"steps": self.steps, "final_loss": float(np.mean(tail)), "first_loss": self.losses[0],
                "seconds": round(seconds, 1), "s_per_step": round(seconds / self.steps, 4),
                "cpu_seconds": round(cpu, 1)}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -------------------------------------------------------------------------------------------------
# Phases
# -------------------------------------------------------------------------------------------------
def train_vae(cfg: TrainSampleConfig, pool: Pool, gen: torch.Generator):
    vae = new_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = Schedule(opt, cfg.vae_steps, cfg.warmup_steps)
    phase = Phase("vae", cfg.vae_steps, cfg.log_every)
    for step in range(1, cfg.vae_steps + 1):
        sched.set(step)
        idx = torch.randint(0, len(pool.images), (cfg.vae_batch,), generator=gen)
        x = flip(to_unit(pool.images[idx]), gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.l1_loss(recon, x) + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        phase.step(step, float(loss.detach()))
    vae.eval()
    return vae, phase.summary()


@torch.no_grad()
def encode_pool(vae, pool: Pool, idx: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of pool images `idx`."""
    means, stds = [], []
    for i in range(0, len(idx), batch):
        post = vae.encode(to_unit(pool.images[idx[i:i + batch]])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg: TrainSampleConfig, pool: Pool, vae, tokenizer, gen: torch.Generator):
    from diffusers import DDPMScheduler, PNDMScheduler

    shapes = pool.shapes
    mean, std = encode_pool(vae, pool, shapes)
    # SD's way, the factor that gives the (sampled) latents a set spread: SD 1.5's 0.18215 gives them unit
    # variance; here latent_std (see the config)
    scaling = float(cfg.latent_std / mean.add(std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    labels = pool.labels[shapes]
    variants = [caption_variants(c) for c in range(len(world.CLASSES))]
    n_var = len(variants[0])
    ids = tokenizer([v for vs in variants for v in vs] + [""], padding="max_length", max_length=MAX_PROMPT_TOKENS,
                    truncation=True, return_tensors="pt").input_ids  # (C * n_var + 1, 77): the last is ""
    text_encoder, unet = new_text_encoder(tokenizer).train(), new_unet().train()
    # the training noise of SD 1.5's schedule, as finetune builds it from the model's scheduler config
    noise_scheduler = DDPMScheduler.from_config(PNDMScheduler(**SD15_SCHEDULER).config)
    alphas = noise_scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = Schedule(opt, cfg.unet_steps, cfg.warmup_steps)
    ema = Ema([unet, text_encoder], cfg.ema_decay)
    phase = Phase("unet+text", cfg.unet_steps, cfg.log_every)
    for step in range(1, cfg.unet_steps + 1):
        sched.set(step)
        idx = torch.randint(0, len(shapes), (cfg.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * vae.config.scaling_factor
        variant = torch.randint(0, n_var, (cfg.unet_batch,), generator=gen)
        rows = labels[idx] * n_var + variant
        rows = torch.where(torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_prob, len(ids) - 1, rows)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids[rows])[0]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=cfg.min_snr) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        phase.step(step, float(loss.detach()))
    ema.copy_to_params()
    return unet.eval(), text_encoder.eval(), phase.summary()


def _blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur of random strength on a random half of the batch: generated images are softer than
    drawn ones, and CLIP must read both."""
    from torchvision.transforms.functional import gaussian_blur

    out = x.clone()
    for i in torch.nonzero(torch.rand(len(x), generator=gen) < 0.5).squeeze(1).tolist():
        sigma = 0.3 + 1.0 * float(torch.rand(1, generator=gen))
        out[i] = gaussian_blur(x[i:i + 1], [5, 5], [sigma, sigma])[0]
    return out


def train_clip(cfg: TrainSampleConfig, pool: Pool, tokenizer, gen: torch.Generator):
    from ..contracts import object_prompts
    from .clip import OPENAI_MEAN, OPENAI_STD

    clip = new_clip(tokenizer).train()
    prompts = [world.caption(c) for c in range(len(world.CLASSES))] + list(object_prompts(world.SUPER_CLASS))
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    n_classes = len(world.CLASSES)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = Schedule(opt, cfg.clip_steps, cfg.warmup_steps)
    phase = Phase("clip", cfg.clip_steps, cfg.log_every)
    for step in range(1, cfg.clip_steps + 1):
        sched.set(step)
        idx = torch.randint(0, len(pool.images), (cfg.clip_batch,), generator=gen)
        x = _blur(flip(pool.images[idx].float() / 255.0, gen), gen)
        labels = pool.labels[idx]
        # the towers and projections as the score stage's Scorer computes its embeddings
        image = clip.visual_projection(clip.vision_model(pixel_values=(x - mean) / std).pooler_output)
        words = clip.text_projection(clip.text_model(**text).pooler_output)
        image, words = F.normalize(image, dim=-1), F.normalize(words, dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image @ words.T
        has = labels >= 0
        # images -> their class prompt; every class prompt -> the images of its class (all equally); images
        # with or without a shape -> the object prompts
        loss = F.cross_entropy(logits[has, :n_classes], labels[has])
        per_prompt = logits[has, :n_classes].T.log_softmax(-1)
        match = F.one_hot(labels[has], n_classes).T.float()
        present = match.sum(1) > 0
        loss = loss - ((per_prompt * match).sum(1)[present] / match.sum(1)[present]).mean()
        loss = loss + F.cross_entropy(logits[:, n_classes:], (~has).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        phase.step(step, float(loss.detach()))
    return clip.eval(), phase.summary()


# -------------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fp16(module: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Module.to(module, torch.float16)


def write_sd(folder: str, vae, unet, text_encoder, tokenizer) -> None:
    """An SD folder as StableDiffusionPipeline.save_pretrained writes it (presets.write_preset's way)."""
    from diffusers import PNDMScheduler

    from .presets import _pipeline, _save_kwargs, _write_classic_tokenizer_files

    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        _fp16(module).save_pretrained(os.path.join(folder, name), **_save_kwargs(module))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    _write_classic_tokenizer_files(tokenizer, os.path.join(folder, "tokenizer"))
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    _pipeline(dict(text_encoder=text_encoder, unet=unet, vae=vae), tokenizer).save_config(folder)


def write_clip(folder: str, clip, tokenizer) -> None:
    from transformers import CLIPImageProcessor

    from .clip import BICUBIC, OPENAI_MEAN, OPENAI_STD

    _fp16(clip).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": RESOLUTION}, resample=BICUBIC,
                       crop_size={"height": RESOLUTION, "width": RESOLUTION}, image_mean=list(OPENAI_MEAN),
                       image_std=list(OPENAI_STD)).save_pretrained(folder)


def train_sample(out: str, cfg: TrainSampleConfig, command: str | None = None, overwrite: bool = False) -> dict:
    """Train both models and write <out>/sd (a diffusers SD folder) and <out>/clip (a CLIPModel folder),
    each with its training record. Returns {"sd": record, "clip": record}."""
    import shutil

    cfg.validate()
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise DiffmixError(f"refusing to train the sample models into {out}: it is not empty; choose another "
                           "folder or pass --overwrite")
    started, load_at_start = time.perf_counter(), _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            t0 = time.perf_counter()
            pool = draw_pool(cfg)
            console.print(f"drew {len(pool.images)} images of the sample world in {time.perf_counter() - t0:.1f} s "
                          f"({len(world.CLASSES)} classes x {cfg.images_per_class} + {cfg.backgrounds} backgrounds)")
            tokenizer = sample_tokenizer()
            vae, vae_summary = train_vae(cfg, pool, gen)
            unet, text_encoder, unet_summary = train_unet(cfg, pool, vae, tokenizer, gen)
            clip, clip_summary = train_clip(cfg, pool, tokenizer, gen)
    finally:
        torch.set_num_threads(threads)
    common = {"command": command or f"{RETRAIN_COMMAND} {out}", "seed": cfg.seed, "config": dataclasses.asdict(cfg),
              "versions": _versions(), "world": {"classes": list(world.CLASS_NAMES), "resolution": RESOLUTION},
              "machine": {"cpus": os.cpu_count(), "torch_threads": cfg.threads, "load_at_start": round(load_at_start, 2),
                          "load_at_end": round(_load(), 2)},
              "wall_s": round(time.perf_counter() - started, 1)}
    if overwrite:
        shutil.rmtree(out, ignore_errors=True)
    records = {}
    for kind, write, losses in (
            ("sd", lambda f: write_sd(f, vae, unet, text_encoder, tokenizer), {"vae": vae_summary, "unet+text": unet_summary}),
            ("clip", lambda f: write_clip(f, clip, tokenizer), {"clip": clip_summary})):
        folder = os.path.join(out, kind)
        staging = f"{folder}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        write(staging)
        records[kind] = sample_io.write_record(staging, common | {"model": kind, "phases": losses})
        os.rename(staging, folder)
    console.print(f"[green]sample models written to {out}[/green] (sd/, clip/) in {common['wall_s']:.0f} s")
    return records


RETRAIN_COMMAND = "diffmix-ray model train-sample"
