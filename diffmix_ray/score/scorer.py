"""The scoring actor: a callable class Ray Data runs on an actor pool, doing only model work. It
takes uint8 pixels already resized and cropped by the CPU stage before it (cpu_stages.prepare_images)
and returns float scores (cast and written by the CPU stage after it). No Ray imports: unit tests
and benchmarks call it directly.

Once per actor: CLIP (and the classifier) on the device (CUDA fp16, CPU fp32: runtime_policy); the
normalised text embeddings of every class prompt and of the two object prompts.

Per batch: one copy of the uint8 pixels to the device, normalisation there, one CLIP image pass
for the synthetic images and one for their distinct source images (several pairs share a source),
every score from those embeddings, one copy back."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..contracts import (CLASS_PROMPT, COL_CLASSIFIER_SOURCE_PROB, COL_CLASSIFIER_TARGET_PROB, COL_CLIP_IMAGE_SIM,
                         COL_CLIP_OBJECT_PROB, COL_CLIP_SOURCE_PROB, COL_CLIP_SOURCE_SIM, COL_CLIP_TARGET_PROB,
                         COL_CLIP_TARGET_SIM, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL, SCORE_COLUMNS,
                         object_prompts)
from ..models.clip import load_clip
from ..models.cpu_threads import TorchThreads, on_cpu
from .cpu_stages import COL_CLIP, COL_CLIP_SRC, COL_CLS, COL_ERROR, COL_SRC_FILE

PROMPT_CHUNK = 256  # class prompts encoded per text-tower call at start-up


def class_prompts(class_names: list[str], super_class: str) -> list[str]:
    return [" ".join(CLASS_PROMPT.format(class_name=c, super_class=super_class).split()) for c in class_names]


class Scorer:
    def __init__(self, clip: str, class_names: list[str], super_class: str, classifier: str | None = None,
                 classifier_fingerprint: str | None = None, device: str | None = None, dtype=None,
                 threads: int | None = None, report_metrics: bool = False, batch_delay_s: float = 0.0):
        # On a CPU, set-up and every batch run on one thread of the actor's own (models/cpu_threads.py).
        self._torch = TorchThreads(on_cpu(device), threads)
        self._torch.run(self._setup, clip, class_names, super_class, classifier, classifier_fingerprint, device,
                        dtype, report_metrics, batch_delay_s)

    def _setup(self, clip, class_names, super_class, classifier, classifier_fingerprint, device, dtype,
               report_metrics, batch_delay_s) -> None:
        self.model, self.tokenizer, self.ref = load_clip(clip, device=device, dtype=dtype)
        self.device, self.dtype = self.model.logit_scale.device, self.model.dtype
        prep = self.ref.prep
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1)
        self.rescale = prep.rescale
        self.logit_scale = self.model.logit_scale.detach().float().exp()
        self.class_text = self.encode_text(class_prompts(class_names, super_class))  # (C, D)
        self.object_text = self.encode_text(list(object_prompts(super_class)))  # (2, D)
        self.classifier = None
        if classifier:
            from .classifier import load_classifier

            model, meta = load_classifier(classifier, classifier_fingerprint)
            self.classifier = model.to(self.device, self.dtype)
            # The run's own normalisation (what train-cls trained and evaluated with).
            self.cls_mean = torch.tensor(meta["data_cfg"]["mean"], device=self.device).view(1, 3, 1, 1)
            self.cls_std = torch.tensor(meta["data_cfg"]["std"], device=self.device).view(1, 3, 1, 1)
        if self.device.type == "cuda":
            self.model.vision_model.to(memory_format=torch.channels_last)
        self.batch_delay_s = batch_delay_s  # test hook: keeps a run going long enough to be killed
        self.metrics = None
        if report_metrics:
            from ..runtime.metrics import StageMetrics

            self.metrics = StageMetrics("score")

    # -----------------------------------------------------------------------------------------
    # Embeddings
    # -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), D) unit-norm text embeddings in float32."""
        out = []
        for i in range(0, len(prompts), PROMPT_CHUNK):
            tokens = self.tokenizer(prompts[i:i + PROMPT_CHUNK], padding=True, truncation=True, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            pooled = self.model.text_model(**tokens).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def pixels(self, u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
        """uint8 (n, H, W, 3) pixels on the actor's device, rescaled and normalised: the model's input
        (public: the score benchmark feeds the same input to its hand-written model)."""
        x = torch.from_numpy(np.ascontiguousarray(u8)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # an NCHW view of NHWC memory: channels_last, as cuDNN likes it
        return ((x * scale - mean) / std).to(self.dtype)

    @torch.inference_mode()
    def encode_images(self, u8: np.ndarray) -> torch.Tensor:
        """(n, D) unit-norm image embeddings in float32 of uint8 (n, H, W, 3) pixels."""
        pooled = self.model.vision_model(pixel_values=self.pixels(u8, self.mean, self.std, self.rescale)).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    # -----------------------------------------------------------------------------------------
    # Per batch
    # -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of `rows` (indices of good rows of `batch`), as (len(rows),) float32 arrays; NaN
        where a score does not apply (no source image, no classifier)."""
        n = len(rows)
        image = self.encode_images(batch[COL_CLIP][rows])
        target = torch.as_tensor(batch[COL_TARGET_LABEL][rows].astype(np.int64), device=self.device)
        source = torch.as_tensor(batch[COL_SOURCE_LABEL][rows].astype(np.int64), device=self.device)
        at = torch.arange(n, device=self.device)
        cos = image @ self.class_text.T
        probs = (self.logit_scale * cos).softmax(-1)
        obj = (self.logit_scale * (image @ self.object_text.T)).softmax(-1)[:, 0]
        out = {COL_CLIP_TARGET_PROB: probs[at, target], COL_CLIP_SOURCE_PROB: probs[at, source],
               COL_CLIP_TARGET_SIM: cos[at, target], COL_CLIP_SOURCE_SIM: cos[at, source], COL_CLIP_OBJECT_PROB: obj}
        nan = torch.full((n,), float("nan"), device=self.device)
        has_src = batch[COL_SRC_FILE][rows] >= 0
        out[COL_CLIP_IMAGE_SIM] = nan.clone()
        if has_src.any():
            ids = batch[COL_SOURCE_ID][rows][has_src].astype(str)
            _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            src = self.encode_images(batch[COL_CLIP_SRC][rows[has_src][first]])
            where = torch.as_tensor(np.flatnonzero(has_src), device=self.device)
            out[COL_CLIP_IMAGE_SIM][where] = (image[where] * src[torch.as_tensor(inverse, device=self.device)]).sum(-1)
        out[COL_CLASSIFIER_TARGET_PROB] = out[COL_CLASSIFIER_SOURCE_PROB] = nan
        if self.classifier is not None:
            x = self.pixels(batch[COL_CLS][rows], self.cls_mean, self.cls_std, 1 / 255)
            p = self.classifier(x).float().softmax(-1)
            out[COL_CLASSIFIER_TARGET_PROB], out[COL_CLASSIFIER_SOURCE_PROB] = p[at, target], p[at, source]
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._torch.run(self._call, batch)

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        errors = [str(e) for e in batch[COL_ERROR]]
        n = len(errors)
        rows = np.array([i for i, e in enumerate(errors) if not e], dtype=np.int64)
        result = {k: v for k, v in batch.items() if k not in (COL_CLIP, COL_CLIP_SRC, COL_CLS)}  # pixels stop here
        for name in SCORE_COLUMNS:
            result[name] = np.full(n, np.nan, dtype=np.float32)
        if len(rows):
            scores = self.score(batch, rows)
            for name, values in scores.items():
                result[name][rows] = values
            # A probability or similarity is always finite; NaN/inf means the model overflowed (fp16).
            must = [scores[c] for c in SCORE_COLUMNS[:5]]
            for j in np.flatnonzero(~np.isfinite(np.stack(must)).all(0)):
                errors[rows[j]] = "CLIP scores are NaN/inf (fp16 overflow?)"
        result[COL_ERROR] = np.array(errors, dtype=object)
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        if self.metrics is not None:
            self.metrics.batch_done(errors, t0)
        return result
