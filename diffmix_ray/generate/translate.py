"""The translation UDF: a callable class Ray Data runs on an actor pool. The model and concept
bank load once in __init__; __call__ maps a batch of pairs to encoded images. No Ray imports:
unit tests call it directly.

Batch invariance: every pair gets its own prompt and its own torch.Generator seeded from the
pair's seed, and img2img is called once per distinct strength in the batch (the pipeline takes
one strength per call). The reference labelled a whole batch with one target and one strength;
here each image is the one its own pair asks for, whatever the batch size."""

from __future__ import annotations

import io
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from ..contracts import COL_IMAGE, COL_PROMPT, COL_SEED, COL_STRENGTH, COL_TARGET_LABEL
from ..errors import DiffmixError
from ..images import decode_rgb
from ..models import concepts as bank_io
from ..models.loader import load_pipeline, to_text2img
from .sources import COL_ERROR, COL_SOURCE_IMAGE  # internal columns, defined beside the light stages

BLACK_MAX = 2.0 / 255.0  # an image whose brightest pixel is below this is treated as black
DEFAULT_REAL_TEMPLATE = "a photo of a {token} {super_class}"


class Translator:
    def __init__(self, model: str, kind: str, class_names: list[str], super_class: str,
                 concepts: str | None = None, steps: int = 25, guidance: float = 7.5,
                 prompt_template: str | None = None, jpeg_quality: int = 95, threads: int | None = None,
                 device: str | None = None, report_metrics: bool = False):
        if not torch.cuda.is_available():
            if threads:
                torch.set_num_threads(max(1, int(threads)))  # = the CPUs Ray granted this actor
            # Denormal floats (|x| < 1e-38) are computed in microcode on x86, 10-100x slower; a
            # UNet's activations can drift into them (measured: img2img 3x slower on some inputs).
            # Flushing them to zero changes no visible pixel.
            torch.set_flush_denormal(True)
        from diffusers import DPMSolverMultistepScheduler

        self.pipe, self.model_ref = load_pipeline(model, device=device)
        # Diff-Mix samples with DPM-Solver++ (25 steps); swapping the scheduler keeps the base config.
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                      algorithm_type="dpmsolver++")
        self.bank = None
        if concepts:
            self.bank, local = bank_io.load_bank(concepts)
            bank_io.apply_bank(self.pipe, self.bank, local)
        self.template = prompt_template or (self.bank.prompt_template if self.bank else DEFAULT_REAL_TEMPLATE)
        self.kind, self.class_names, self.super_class = kind, class_names, super_class
        self.steps, self.guidance, self.jpeg_quality = steps, guidance, jpeg_quality
        self.text2img = to_text2img(self.pipe) if kind == "gen" else None
        self.resolution = self.model_ref.resolution
        self.device = self.pipe.device
        self.metrics = None
        if report_metrics:
            from ..ops.metrics import GenerateMetrics

            self.metrics = GenerateMetrics()

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

    def _run(self, prompts: list[str], seeds: list[int], strength: float, images: list[Image.Image] | None) -> np.ndarray:
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        common = dict(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                      generator=generators, output_type="np")
        with torch.inference_mode():
            if images is None:
                return self.text2img(height=self.resolution, width=self.resolution, **common).images
            size = (self.resolution, self.resolution)
            # As the reference: bilinear resize to the model's square resolution (aspect not kept);
            # the output is resized back to the source's size below.
            resized = [im.resize(size, Image.BILINEAR) for im in images]
            return self.pipe(image=resized, strength=float(strength), **common).images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch[COL_SEED])
        prompts = [self.prompt(int(t)) for t in batch[COL_TARGET_LABEL]]
        errors = [""] * n
        sources: list[Image.Image | None] = [None] * n
        if self.kind != "gen":
            for i, data in enumerate(batch[COL_SOURCE_IMAGE]):
                try:
                    sources[i] = decode_rgb(data if data is not None else b"")
                except ValueError as e:  # BadImage: counted and reported, the run goes on
                    errors[i] = f"source image failed to decode: {e}"
        groups: dict[float, list[int]] = defaultdict(list)
        for i in range(n):
            if not errors[i]:
                groups[float(batch[COL_STRENGTH][i])].append(i)
        encoded, widths, heights = [b""] * n, [0] * n, [0] * n
        for strength, idx in sorted(groups.items()):
            images = None if self.kind == "gen" else [sources[i] for i in idx]
            out = self._run([prompts[i] for i in idx], [int(batch[COL_SEED][i]) for i in idx], strength, images)
            for j, i in enumerate(idx):
                arr = out[j]
                if not np.isfinite(arr).all():
                    errors[i] = "generated image contains NaN/inf (fp16 overflow?)"
                    continue
                if float(arr.max()) < BLACK_MAX:
                    errors[i] = "generated image is black"
                    continue
                img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
                if sources[i] is not None and img.size != sources[i].size:
                    img = img.resize(sources[i].size, Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=self.jpeg_quality)
                encoded[i], widths[i], heights[i] = buf.getvalue(), img.width, img.height
        result = {k: v for k, v in batch.items() if k != COL_SOURCE_IMAGE and not k.startswith("_")}
        result.update({COL_IMAGE: np.array(encoded, dtype=object), "width": np.array(widths, dtype=np.int32),
                       "height": np.array(heights, dtype=np.int32), COL_PROMPT: np.array(prompts, dtype=object),
                       COL_ERROR: np.array(errors, dtype=object)})
        if self.metrics is not None:
            self.metrics.batch_done(ok=sum(1 for e in errors if not e), failed=sum(1 for e in errors if e),
                                    seconds=time.perf_counter() - t0)
        return result

