"""The translation actor: a callable class Ray Data runs on an actor pool, doing only GPU work.
It takes uint8 pixels at the model's resolution (decoded and resized by the CPU stage before it,
cpu_stages.prepare_sources) and returns uint8 pixels (encoded by the CPU stage after it). No Ray
imports: unit tests and benchmarks call it directly.

Once per actor: the concept bank's LoRA is fused into the UNet's weights (no adapter kernels per
forward); the prompt embeddings of every class and of the empty prompt are computed; UNet and
VAE run channels_last on CUDA; optionally the UNet is compiled, with batches padded to one size
so one graph serves the whole run.

Per batch: pairs are grouped by the number of denoising steps they run (plan.denoising_steps)
and cut into device batches; on a CPU the device batches run on single-threaded streams, one per
CPU (models/cpu_threads.py says why). Each device batch is VAE-encoded in one call, and every pair
draws its latent sample and its noise from its own torch.Generator seeded with the pair's seed,
exactly as diffusers does image by image, so each image is the one its pair asks for at any batch
size. The float -> uint8 conversion and the
NaN/black checks run on the device; one copy brings the batch's pixels back."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch

from ..contracts import COL_PROMPT, COL_SEED, COL_STRENGTH, COL_TARGET_LABEL, PLAN_SCHEMA
from ..errors import DiffmixError
from ..models import concepts as bank_io
from ..models.compiling import CompileCache
from ..models.cpu_threads import TorchThreads, on_cpu
from ..models.loader import load_pipeline, to_text2img, with_own_scheduler
from .cpu_stages import COL_ERROR, COL_PIXELS, COL_SOURCE_H, COL_SOURCE_W, decode_sources, finish_images
from .plan import denoising_steps

BLACK_MAX = 2.0 / 255.0  # an image whose brightest pixel is below this is treated as black
DEFAULT_REAL_TEMPLATE = "a photo of a {token} {super_class}"
PROMPT_CHUNK = 64  # class prompts encoded per text-encoder call at start-up
PAD_SEED = 0  # seed of the padding rows of a compiled batch (their images are dropped)


def strength_for_steps(n: int, steps: int) -> float:
    """A strength for which diffusers' img2img runs exactly n of `steps` steps (it computes
    int(steps * strength)); the half-step margin makes float rounding irrelevant."""
    return min(1.0, (n + 0.5) / steps)


class Translator:
    def __init__(self, model: str, kind: str, class_names: list[str], super_class: str,
                 concepts: str | None = None, steps: int = 25, guidance: float = 7.5,
                 prompt_template: str | None = None, threads: int | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int | None = None, compile: bool = False, compile_cache: str | None = None,
                 fuse_lora: bool = True, report_metrics: bool = False, streams: int | None = None):
        # On a CPU, set-up and every batch run on threads of the actor's own (cpu_threads.py):
        # `streams` single-threaded ones (default: one per thread) or, with 1, one OpenMP team of
        # `threads`. A compiled UNet keeps to one stream.
        if streams is None:
            streams = 1 if compile else (threads or 1)
        self._torch = TorchThreads(on_cpu(device), threads, streams)
        self._shells = threading.local()
        self._torch.run(self._setup, model, kind, class_names, super_class, concepts, steps, guidance,
                        prompt_template, device, dtype, batch_size, compile, compile_cache, fuse_lora,
                        report_metrics)

    def _setup(self, model, kind, class_names, super_class, concepts, steps, guidance, prompt_template, device,
               dtype, batch_size, compile, compile_cache, fuse_lora, report_metrics) -> None:
        from diffusers import DPMSolverMultistepScheduler

        if compile and not batch_size:
            raise DiffmixError("compile needs batch_size: batches are padded to it so one compiled graph serves all")
        self.pipe, self.model_ref = load_pipeline(model, device=device, dtype=dtype)
        # Diff-Mix samples with DPM-Solver++ (25 steps); swapping the scheduler keeps the base config.
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                      algorithm_type="dpmsolver++")
        self.bank = None
        if concepts:
            self.bank, local = bank_io.load_bank(concepts)
            bank_io.apply_bank(self.pipe, self.bank, local)
            if self.bank.has_lora and fuse_lora:
                # W + BA once, then drop the adapters: no extra kernels in any UNet forward.
                self.pipe.fuse_lora()
                self.pipe.unload_lora_weights()
        self.template = prompt_template or (self.bank.prompt_template if self.bank else DEFAULT_REAL_TEMPLATE)
        self.kind, self.class_names, self.super_class = kind, class_names, super_class
        self.steps, self.guidance, self.batch_size = steps, guidance, batch_size
        self.resolution = self.model_ref.resolution
        self.device, self.dtype = self.pipe.device, self.pipe.unet.dtype
        self.prompts = [self.prompt(label) for label in range(len(class_names))]
        self.class_embeds, self.empty_embeds = self._encode_prompts()
        if self.device.type == "cuda":  # cuDNN's NHWC convolutions; on CPU it measured no faster
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        self.compile_cache = None
        if compile:
            self._compile(compile_cache)
        self.text2img = to_text2img(self.pipe) if kind == "gen" else None  # shares the (compiled) UNet
        if compile:
            self._warm_up()
        self.metrics = None
        if report_metrics:
            from ..runtime.metrics import StageMetrics

            self.metrics = StageMetrics("generate")

    # -----------------------------------------------------------------------------------------
    # Start-up
    # -----------------------------------------------------------------------------------------
    def prompt(self, label: int) -> str:
        if not 0 <= label < len(self.class_names):
            raise DiffmixError(f"target class {label} is outside 0..{len(self.class_names) - 1}")
        if self.bank is not None:
            if label >= len(self.bank.tokens):
                raise DiffmixError(f"target class {label} has no token in the concept bank "
                                   f"({len(self.bank.tokens)} tokens)")
            token = self.bank.tokens[label] if self.bank.has_tokens else self.class_names[label]
        else:
            token = self.class_names[label]
        return " ".join(self.template.format(token=token, super_class=self.super_class).split())

    @torch.inference_mode()
    def _encode_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, 77, D) embeddings of every class prompt and (1, 77, D) of the empty prompt (the
        unconditional half of classifier-free guidance), through the pipeline's own encoder, so
        textual-inversion tokens resolve as in any diffusers call."""
        def encode(prompts: list[str]) -> torch.Tensor:
            return self.pipe.encode_prompt(prompts, self.device, 1, False)[0]

        classes = torch.cat([encode(self.prompts[i:i + PROMPT_CHUNK])
                             for i in range(0, len(self.prompts), PROMPT_CHUNK)])
        return classes, encode([""])

    def _compile(self, cache_uri: str | None) -> None:
        unet = self.pipe.unet
        latent = self.resolution // self.pipe.vae_scale_factor
        self.compile_cache = CompileCache(cache_uri, "unet", {
            "unet": dict(unet.config), "dtype": str(self.dtype), "batch": self.batch_size, "latent": latent,
            "cfg": self.guidance > 1, "kind": self.kind}, self.device)
        self.compile_cache.load()
        self.pipe.unet = torch.compile(unet, fullgraph=True, dynamic=False)

    def _warm_up(self) -> None:
        """Compile now, through the real call path (shapes, strides, dtypes as every batch will
        have them), rather than in the first batch; then share what was compiled."""
        labels, seeds = [0] * self.batch_size, [PAD_SEED] * self.batch_size
        pixels = None if self.kind == "gen" else np.zeros((self.batch_size, self.resolution, self.resolution, 3),
                                                          dtype=np.uint8)
        self.translate(pixels, labels, seeds, n_steps=1)
        self.compile_cache.save()

    # -----------------------------------------------------------------------------------------
    # Per batch
    # -----------------------------------------------------------------------------------------
    def _pad(self, n: int) -> int:
        """Rows to add so a compiled UNet always sees one batch size."""
        return self.batch_size - n if self.compile_cache is not None and n < self.batch_size else 0

    def _pipelines(self):
        """(img2img, text2img) pipelines for the calling thread: with several streams each thread
        has its own around the shared modules, since a pipeline call keeps state on its scheduler."""
        if self._torch.streams == 1:
            return self.pipe, self.text2img
        if not hasattr(self._shells, "pipe"):
            self._shells.pipe = with_own_scheduler(self.pipe)
            self._shells.text2img = to_text2img(self._shells.pipe) if self.kind == "gen" else None
        return self._shells.pipe, self._shells.text2img

    @torch.inference_mode()
    def translate(self, pixels: np.ndarray | None, labels: list[int], seeds: list[int],
                  n_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One group of pairs that all run `n_steps` denoising steps (img2img), or text-to-image
        when `pixels` is None. Returns (uint8 (n, R, R, 3) pixels, finite flags, black flags)."""
        n = len(labels)
        pad = self._pad(n)
        labels, seeds = list(labels) + [0] * pad, list(seeds) + [PAD_SEED] * pad
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        rows = len(labels)
        common = dict(prompt_embeds=self.class_embeds[torch.as_tensor(labels, device=self.device)],
                      negative_prompt_embeds=self.empty_embeds.expand(rows, -1, -1),
                      num_inference_steps=self.steps, guidance_scale=self.guidance, generator=generators,
                      output_type="latent")
        pipe, text2img = self._pipelines()
        vae = pipe.vae
        if pixels is None:
            latents = text2img(height=self.resolution, width=self.resolution, **common).images
        else:
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
            if pad:
                x = torch.cat([x, x[:1].expand(pad, -1, -1, -1)])
            x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0  # NCHW view of NHWC: channels_last
            # One encode for the group; each pair samples its latent with its own generator (as
            # diffusers' per-image encode does), so its stream continues into its noise.
            init = vae.encode(x).latent_dist.sample(generator=generators) * vae.config.scaling_factor
            latents = pipe(image=init, strength=strength_for_steps(n_steps, self.steps), **common).images
        images = vae.decode(latents[:n] / vae.config.scaling_factor).sample.float()
        finite = torch.isfinite(images).flatten(1).all(1)
        images = (images / 2 + 0.5).clamp(0, 1)
        black = images.flatten(1).amax(1) < BLACK_MAX
        u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return u8.cpu().numpy(), finite.cpu().numpy(), black.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of pairs (any size: Ray Data hands the actor whole chunks, so its per-call cost is
        paid per chunk, not per device batch) -> the same rows with their output pixels. Pairs are
        grouped by step count, and each group runs in device batches of at most `batch_size`, on
        the actor's torch threads."""
        t0 = time.perf_counter()
        labels = [int(t) for t in batch[COL_TARGET_LABEL]]
        n = len(labels)
        errors = [str(e) for e in batch[COL_ERROR]] if COL_ERROR in batch else [""] * n
        out = np.zeros((n, self.resolution, self.resolution, 3), dtype=np.uint8)
        groups: dict[int, list[int]] = defaultdict(list)
        for i in range(n):
            if not errors[i]:
                steps = self.steps if self.kind == "gen" else denoising_steps(batch[COL_STRENGTH][i], self.steps)
                groups[steps].append(i)
        size = self.batch_size or n
        if self._torch.streams > 1:  # a chunk of few pairs still gives every CPU stream a batch
            size = min(size, max(1, math.ceil(sum(map(len, groups.values())) / self._torch.streams)))
        device_batches = [(n_steps, group[start:start + size])  # at most batch_size pairs each
                          for n_steps, group in sorted(groups.items()) for start in range(0, len(group), size)]
        results = self._torch.map(lambda job: self._translate_rows(batch, job[1], job[0], labels), device_batches)
        for (_, idx), (images, finite, black) in zip(device_batches, results):
            for j, i in enumerate(idx):
                if not finite[j]:
                    errors[i] = "generated image contains NaN/inf (fp16 overflow?)"
                elif black[j]:
                    errors[i] = "generated image is black"
                else:
                    out[i] = images[j]
        result = dict(batch)
        result.update({COL_PIXELS: out, COL_ERROR: np.array(errors, dtype=object),
                       COL_PROMPT: np.array([self.prompts[t] for t in labels], dtype=object)})
        if COL_SOURCE_W not in result:  # text-to-image: keep the model's size
            result[COL_SOURCE_W] = result[COL_SOURCE_H] = np.zeros(n, dtype=np.int32)
        if self.metrics is not None:
            self.metrics.batch_done(errors, t0)
        return result

    def _translate_rows(self, batch: dict, idx: list[int], n_steps: int,
                        labels: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = None if self.kind == "gen" else batch[COL_PIXELS][idx]
        return self.translate(pixels, [labels[i] for i in idx], [int(batch[COL_SEED][i]) for i in idx], n_steps)


def translate_locally(translator: Translator, plan: pa.Table, sources: list[bytes] | None,
                      jpeg_quality: int = 95) -> pa.Table:
    """The three stages in this process, without Ray: `plan` rows (+ their sources' bytes for
    image-to-image kinds) -> shard rows. What `plan --calibrate` and the benchmarks time."""
    columns = {name: plan.column(name).to_numpy(zero_copy_only=False) for name in PLAN_SCHEMA.names}
    batch = columns if sources is None else decode_sources(columns, sources, translator.resolution)
    return finish_images(translator(batch), None, jpeg_quality)
