"""finetune step benchmark, without Ray: training steps/s of the project's step (finetune.loop: the
Finetuner and its train() loop, fed in-memory batches) against bare diffusers TI + LoRA loops with
the same model, batch, precision, LoRA and optimizer, measured side by side in one process.

    .venv/bin/python bench/bench_finetune_step.py --device cpu --preset bench      # ~1-2 min on 2 cores
    python bench/bench_finetune_step.py --device cuda --preset sd15               # one GPU, compile included

Variants (--variants, comma-separated; the first ones are the references):
  scripts          the loop of diffusers' example scripts (textual_inversion.py + LoRA): the whole
                   embedding matrix trainable, the other rows copied back after every step, the loss
                   read (.item()) every step for the progress bar
  minimal          the least a loop can do: the project's small token parameter, no bookkeeping, the
                   loss read once per round. The floor: project/minimal is the project's own overhead
  project          finetune.loop.train() with a Finetuner, as a Ray Train worker runs it
  project-gc       ... with --gradient-checkpointing
  project-compile  ... with --compile (its warm-up steps compile: see warmup_s). Default on CUDA only:
                   inductor's C++ build of the bench UNet takes ~3.5 min on the 2-core CPU here

Rounds of --steps steps run in turn for every variant (so a neighbour's load hits them alike); each
round ends by waiting for the device. Figures: median steps/s over the rounds, and ratios to
`scripts` and `minimal` (target: project/scripts >= 0.95). On CPU also per second of this process's
CPU time, which a busy neighbour disturbs much less than wall time. A batch that runs out of device
memory is halved until it fits. Prints figures and writes them to bench/results/ (--json); asserts
nothing about timing. Imports nothing from Ray (checked at the end), so it runs where Ray is not
installed."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

from _harness import Bench, Rounds, describe_device, device_label, halving, ratios, ray_modules, sync, timed

VARIANTS = ("scripts", "minimal", "project", "project-gc", "project-compile")
PROMPT = "a photo of a {token} bird"


@dataclasses.dataclass(frozen=True)
class Setup:
    model_dir: str
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    batch_size: int
    classes: int
    rank: int
    seed: int
    precision: str = "auto"


# ---------------------------------------------------------------------------------------------
# Bare loops: plain diffusers + peft, written as a user would
# ---------------------------------------------------------------------------------------------
class BareLoop:
    """Frozen VAE/UNet/text encoder in the run's dtype, a rank-r LoRA on every UNet attention
    q/k/v/out, one new token per class, AdamW (5e-5, weight decay 1e-2), clipping at 1.0."""

    def __init__(self, s: Setup, full_matrix: bool):
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.s, self.full_matrix = s, full_matrix
        pipe = StableDiffusionPipeline.from_pretrained(s.model_dir, dtype=s.weight_dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(s.device)
        self.vae, self.unet, self.text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.vae, self.unet, self.text_encoder):
            module.requires_grad_(False)
        tokens = [f"<class_{i}>" for i in range(s.classes)]
        init_id = tokenizer.encode("bird", add_special_tokens=False)[0]
        tokenizer.add_tokens(tokens)
        token_ids = tokenizer.convert_tokens_to_ids(tokens)
        if full_matrix:  # textual_inversion.py: resize, initialise the new rows, train the whole matrix
            # Keep at least the model's own rows (SD 1.5: 49,408), as a real SD tokenizer would.
            rows = max(len(tokenizer), self.text_encoder.get_input_embeddings().num_embeddings)
            self.text_encoder.resize_token_embeddings(rows, mean_resizing=False)  # the new rows are set below
            weight = self.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[token_ids] = weight[init_id].clone()
            weight.requires_grad_(True)
            self.index_no_updates = torch.ones(rows, dtype=torch.bool, device=s.device)
            self.index_no_updates[min(token_ids):max(token_ids) + 1] = False
            token_params = [weight]
        else:  # the class rows as their own parameter, looked up with torch.where (no masks, no syncs)
            self.base = self.text_encoder.get_input_embeddings()
            self.first_id = token_ids[0]
            self.vectors = torch.nn.Parameter(self.base.weight[init_id].detach().float().repeat(s.classes, 1))
            base, first_id, vectors = self.base, self.first_id, self.vectors

            class Lookup(torch.nn.Module):
                def forward(self, ids):
                    is_class = ids >= first_id
                    rows = torch.nn.functional.embedding((ids - first_id).clamp(min=0), vectors)
                    return torch.where(is_class.unsqueeze(-1), rows, base(ids.masked_fill(is_class, 0)).float())

            self.text_encoder.set_input_embeddings(Lookup())
            token_params = [self.vectors]
        torch.manual_seed(s.seed)
        self.unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        if full_matrix:
            # The rows to restore, copied after the cast: the trained matrix is fp32 now (in a bf16/fp16
            # run a copy taken before it would be the frozen dtype, and the restore would refuse it).
            self.orig_embeds = self.text_encoder.get_input_embeddings().weight.detach().clone()
        self.unet.train()
        self.text_encoder.train()
        lora = [p for p in self.unet.parameters() if p.requires_grad]
        self.params = token_params + lora
        self.optimizer = torch.optim.AdamW([{"params": token_params}, {"params": lora}], lr=5e-5, weight_decay=1e-2)
        self.prompt_ids = tokenizer([PROMPT.format(token=t) for t in tokens], padding="max_length",
                                    max_length=tokenizer.model_max_length, truncation=True,
                                    return_tensors="pt").input_ids.to(s.device)
        self.token_params_bytes = sum(p.numel() * p.element_size() for p in token_params)

    def step(self, batch: dict) -> torch.Tensor:
        s = self.s
        pixels = batch["pixels"].float() / 127.5 - 1.0
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(s.weight_dtype)).latent_dist.sample().float()
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=s.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(s.device.type, dtype=s.autocast_dtype or torch.float32,
                            enabled=s.autocast_dtype is not None):
            hidden = self.text_encoder(self.prompt_ids[batch["label"]])[0]
            pred = self.unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.full_matrix:
            self.restore_frozen_rows()
            loss.detach().item()  # the example scripts log the loss every step
        return loss.detach()

    def restore_frozen_rows(self) -> None:
        """textual_inversion.py: every row but the new tokens' back to its value before training."""
        with torch.no_grad():
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.index_no_updates] = self.orig_embeds[self.index_no_updates]

    def run(self, batches: list[dict], steps: int) -> None:
        losses = [self.step(batches[i % len(batches)]) for i in range(steps)]
        float(torch.stack(losses).mean())  # the round ends when the device is done


# ---------------------------------------------------------------------------------------------
# The project's step: Finetuner + train(), as inside a Ray Train worker
# ---------------------------------------------------------------------------------------------
class ProjectLoop:
    def __init__(self, s: Setup, gradient_checkpointing: bool = False, compile_unet: bool = False):
        from diffmix_ray.finetune.config import FinetuneConfig
        from diffmix_ray.finetune.loop import Finetuner, Progress

        self.cfg = FinetuneConfig(dataset="(in-memory batches)", out="(none)", model=s.model_dir, lr=5e-5,
                                  ti_lr=5e-5, rank=s.rank, batch_size=s.batch_size, seed=s.seed,
                                  checkpoint_every=10**9, gradient_checkpointing=gradient_checkpointing,
                                  compile=compile_unet, precision=s.precision)
        tokens = self.cfg.tokens(s.classes)
        self.tuner = Finetuner(self.cfg, [PROMPT.format(token=t) for t in tokens], tokens, [self._init_id(s)],
                               s.device)
        self.progress = Progress()
        token_params = self.tuner.optimizer.param_groups[0]["params"]  # the class vectors (group 0)
        self.token_params_bytes = sum(p.numel() * p.element_size() for p in token_params)

    @staticmethod
    def _init_id(s: Setup) -> int:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(s.model_dir, "tokenizer"), local_files_only=True)
        return tokenizer.encode("bird", add_special_tokens=False)[0]

    def run(self, batches: list[dict], steps: int) -> None:
        from diffmix_ray.finetune.loop import train

        self.tuner.cfg = dataclasses.replace(self.cfg, max_steps=self.progress.step + steps)
        epochs = iter(lambda: batches, None)  # an endless sequence of identical epochs
        train(self.tuner, epochs, self.progress, lambda metrics, checkpoint: None)  # ends with a report: a sync


# ---------------------------------------------------------------------------------------------
def make_setup(args, work: str) -> tuple[Setup, int]:
    """(the setup, the model's resolution)."""
    from diffmix_ray.errors import DiffmixError
    from diffmix_ray.finetune.loop import precision_dtypes
    from diffmix_ray.models.loader import resolve_model
    from diffmix_ray.models.presets import PRESETS, write_preset

    if args.model is None and args.preset not in PRESETS:
        raise DiffmixError(f"--preset {args.preset!r} is not a model preset of this checkout (it has "
                           f"{', '.join(sorted(PRESETS))}); pick one of those, or use a checkout that has it")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffmixError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    weight_dtype, autocast_dtype = precision_dtypes(args.precision, device)
    # every variant loads the same weights
    model_dir = args.model or write_preset(args.preset, os.path.join(work, args.preset))
    setup = Setup(model_dir, device, weight_dtype, autocast_dtype, args.batch_size, args.classes, args.rank, seed=0,
                  precision=args.precision)
    return setup, resolve_model(model_dir).resolution


class MemoryMeter:
    """The device memory one variant takes itself: its peak over what was allocated before it was
    built. The variants' rounds interleave, so the earlier variants' models stay on the device, and
    the device's plain peak would count them too. `stats`: torch.cuda by default."""

    def __init__(self, device: torch.device, stats=None):
        self.device, self.stats = device, stats or torch.cuda
        self.before = self.stats.memory_allocated(device)
        self.stats.reset_peak_memory_stats(device)

    def own_peak_gib(self) -> float:
        return round((self.stats.max_memory_allocated(self.device) - self.before) / 2**30, 2)


def make_batches(s: Setup, resolution: int, n: int = 4) -> list[dict]:
    """Random uint8 images and labels, already on the device (as Ray's iter_torch_batches delivers them)."""
    g = torch.Generator().manual_seed(0)
    return [{"pixels": torch.randint(0, 256, (s.batch_size, 3, resolution, resolution), dtype=torch.uint8,
                                     generator=g).to(s.device),
             "label": torch.randint(0, s.classes, (s.batch_size,), generator=g).to(s.device),
             "key": torch.randint(-2**62, 2**62, (s.batch_size,), generator=g).to(s.device)} for _ in range(n)]


def build(variant: str, s: Setup):
    return {"scripts": lambda: BareLoop(s, full_matrix=True),
            "minimal": lambda: BareLoop(s, full_matrix=False),
            "project": lambda: ProjectLoop(s),
            "project-gc": lambda: ProjectLoop(s, gradient_checkpointing=True),
            "project-compile": lambda: ProjectLoop(s, compile_unet=True)}[variant]()


def quiet() -> None:
    """No progress bars or load-time warnings between the figures."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def figures(variants, rounds: Rounds, warmup_s, memory, loops, s: Setup) -> dict:
    """Per variant: median steps/s over the rounds so far, ratios to the bare loops, and the rest."""
    rates, cpu_rates = rounds.median(), rounds.median(cpu=True)
    rows = {}
    for name in variants:
        row = {"steps_per_s": round(rates[name], 3), "rounds_steps_per_s": [round(r, 3) for r in rounds.wall[name]]}
        row |= ratios(rates, name, ("scripts", "minimal", "project"),
                      applies=lambda name, ref: ref != "project" or name.startswith("project-"))
        if s.device.type == "cpu":  # CPU time: what the step costs, whatever else the cores are doing
            row["steps_per_cpu_s"] = round(cpu_rates[name], 3)
            row |= ratios(cpu_rates, name, ("scripts", "minimal"), prefix="cpu_vs_")
        row |= {"warmup_s": round(warmup_s[name], 1),
                "token_param_mb": round(loops[name].token_params_bytes / 2**20, 3)}
        if name in memory:
            row["peak_gpu_gib"] = memory[name]  # its own: see MemoryMeter
        rows[name] = row
    return rows


bench = Bench("finetune-step", __doc__)
ap = bench.parser
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--preset", default="bench", help="model preset (built from config, random weights)")
ap.add_argument("--model", default=None, help="a model folder to use instead of writing the preset")
ap.add_argument("--precision", default="auto", help="auto (CUDA: bf16 where supported, else fp16; CPU: fp32) | "
                                                   "bf16 (also on a CPU: the GPU's dtype paths) | fp16 | fp32")
ap.add_argument("--batch-size", type=int, default=2, help="images per step (Diff-Mix: 2 per GPU)")
ap.add_argument("--classes", type=int, default=200, help="class tokens (CUB-200: 200)")
ap.add_argument("--rank", type=int, default=10, help="LoRA rank (Diff-Mix: 10)")
ap.add_argument("--steps", type=int, default=4, help="steps per round")
ap.add_argument("--rounds", type=int, default=7, help="short rounds, many: the median sheds a neighbour's bursts")
ap.add_argument("--warmup", type=int, default=2, help="steps per variant before timing")
ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadiest on a shared machine)")
ap.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; "
                                                 "on CPU all but project-compile)")


def measure(args, results) -> None:
    default = VARIANTS if args.device.startswith("cuda") else VARIANTS[:-1]
    variants = bench.pick("--variants", args.variants, VARIANTS, default)
    if args.device.startswith("cpu"):
        torch.set_num_threads(args.threads)

    from diffmix_ray.errors import DiffmixError

    quiet()
    started = time.perf_counter()
    results.update(device=describe_device(args.device), model=args.model or args.preset, torch=torch.__version__,
                   batch_size=args.batch_size, classes=args.classes, rank=args.rank, steps_per_round=args.steps,
                   rounds=args.rounds, variants={})
    with tempfile.TemporaryDirectory(prefix="bench-ft-step-") as work:
        try:
            s, resolution = make_setup(args, work)
        except DiffmixError as e:
            sys.exit(f"bench_finetune_step: {e}")
        results.update(dtype=str(s.weight_dtype), autocast=str(s.autocast_dtype))

        def at_batch(batch_size: int) -> None:
            setup = dataclasses.replace(s, batch_size=batch_size)
            results.update(batch_size=batch_size, variants={})
            batches = make_batches(setup, resolution)
            loops, warmup_s, memory = {}, {}, {}
            for name in variants:
                meter = MemoryMeter(setup.device) if setup.device.type == "cuda" else None
                loops[name] = build(name, setup)
                # includes compiling, for project-compile
                warmup_s[name] = timed(lambda: loops[name].run(batches, args.warmup), lambda: sync(setup.device))
                if meter is not None:
                    memory[name] = meter.own_peak_gib()
                print(f"{name}: built and warmed up ({warmup_s[name]:.1f} s)", flush=True)
                results.add("variants", name, {"warmup_s": round(warmup_s[name], 1), "peak_gpu_gib": memory.get(name)})
            rounds = Rounds({name: lambda steps, loop=loops[name]: loop.run(batches, steps) for name in variants},
                            sync=lambda: sync(setup.device))
            rounds.run(args.rounds, args.steps, after_round=lambda r: results.update(
                variants=figures(variants, rounds, warmup_s, memory, loops, setup), rounds_done=r + 1,
                wall_s=round(time.perf_counter() - started, 1)))

        halving(at_batch, args.batch_size)
    ray_loaded = ray_modules()
    results.update(ray_imported=bool(ray_loaded), wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps({k: v for k, v in results.data.items() if k != "run"}, indent=2))
    if ray_loaded:
        sys.exit(f"bench_finetune_step imported Ray ({ray_loaded[:3]}): it must run where Ray is not installed")


if __name__ == "__main__":
    bench.main(measure, lambda args: device_label(args.device))
