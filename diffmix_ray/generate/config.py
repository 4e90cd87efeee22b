"""Typed configuration of `generate` and `plan`, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DiffmixError

# mode -> (needs a concept bank, translation kind). Kinds: "mix" inter-class img2img, "aug"
# intra-class img2img, "gen" text-to-image of the target class.
MODES: dict[str, tuple[bool, str]] = {
    "diff-mix": (True, "mix"),
    "diff-aug": (True, "aug"),
    "diff-gen": (True, "gen"),
    "real-mix": (False, "mix"),
    "real-aug": (False, "aug"),
    "real-gen": (False, "gen"),
    "da-fusion": (True, "aug"),
}
DA_FUSION_STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # DA-Fusion's "stacked" strengths
SOURCE_SAMPLING = ("class-uniform", "per-image")
TARGET_SAMPLING = ("uniform", "inverse-frequency")
DEFAULT_MULTIPLIER = 5.0  # pairs = 5 x train images, the Diff-Mix default


@dataclass(frozen=True)
class GenerateConfig:
    dataset: str
    model: str = "tiny"
    out: str = ""
    concepts: str | None = None
    mode: str = "diff-mix"
    # volume: pairs = multiplier x train images, or per_image pairs for every train image
    multiplier: float | None = None  # default 5 (the paper's) when per_image is not given either
    per_image: int | None = None
    # None: per-image on long-tailed datasets (sources follow the long-tailed image distribution, as the
    # reference's long-tail generation), class-uniform otherwise (its default); run.resolve_inputs decides
    source_sampling: str | None = None
    target_sampling: str = "uniform"
    # strength: fixed value, a set sampled uniformly, or Beta(a, b) clipped to [0.1, 0.9]
    strength: float = 0.7
    strength_set: tuple[float, ...] | None = None
    strength_beta: tuple[float, float] | None = None
    seed: int = 0
    # sampler (Diff-Mix defaults: DPM-Solver++ 25 steps, CFG 7.5)
    steps: int = 25
    guidance: float = 7.5
    prompt_template: str | None = None  # default: the concept bank's, else "a photo of a {name} {super_class}"
    # execution
    batch_size: int = 8
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    cpus_per_actor: float = 1.0
    memory_per_actor_gb: float | None = None
    rows_per_shard: int = 1000
    jpeg_quality: int = 95
    limit: int | None = None  # generate only the first N pairs of the plan (smoke runs)
    compile: bool = False  # torch.compile the UNet (batches padded to batch_size)
    compile_cache: str | None = None  # URI shared by actors: the first compiles, the rest load

    def __post_init__(self) -> None:
        if self.multiplier is None and self.per_image is None:
            object.__setattr__(self, "multiplier", DEFAULT_MULTIPLIER)
        for key in ("strength_set", "strength_beta"):  # YAML gives lists
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))

    @property
    def needs_bank(self) -> bool:
        return MODES[self.mode][0]

    @property
    def kind(self) -> str:
        return MODES[self.mode][1]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DiffmixError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.needs_bank and not self.concepts:
            raise DiffmixError(f"--mode {self.mode} translates with a fine-tuned concept bank: pass --concepts URI "
                               "(from `diffmix-ray finetune`), or use real-mix/real-aug/real-gen with the base model")
        if not self.needs_bank and self.concepts:
            raise DiffmixError(f"--mode {self.mode} uses the vanilla base model; drop --concepts or use a diff-* mode")
        if (self.multiplier is None) == (self.per_image is None):
            raise DiffmixError("give exactly one of --multiplier (pairs = multiplier x train images) or --per-image M")
        if self.multiplier is not None and not self.multiplier > 0:
            raise DiffmixError(f"--multiplier {self.multiplier} must be > 0")
        if self.per_image is not None and self.per_image < 1:
            raise DiffmixError(f"--per-image {self.per_image} must be >= 1")
        if self.source_sampling is not None and self.source_sampling not in SOURCE_SAMPLING:
            raise DiffmixError(f"--source-sampling {self.source_sampling!r}: choose {' or '.join(SOURCE_SAMPLING)}")
        if self.target_sampling not in TARGET_SAMPLING:
            raise DiffmixError(f"--target-sampling {self.target_sampling!r}: choose {' or '.join(TARGET_SAMPLING)}")
        for s in (self.strength,) + tuple(self.strength_set or ()):
            if not 0.0 < s <= 1.0:
                raise DiffmixError(f"strength {s} is outside (0, 1]: 0 would copy the source, >1 is undefined")
        if self.strength_set is not None and not self.strength_set:
            raise DiffmixError("--strength-set lists no number; give the strengths to sample, e.g. 0.3,0.5,0.7,0.9, "
                               "or drop it for the fixed --strength")
        if self.strength_set is not None and self.strength_beta is not None:
            raise DiffmixError("give at most one of --strength-set and --strength-beta")
        if self.strength_beta is not None and (len(self.strength_beta) != 2 or min(self.strength_beta) <= 0):
            raise DiffmixError(f"--strength-beta {self.strength_beta} must be two positive numbers a,b")
        if self.steps < 1 or self.guidance < 0:
            raise DiffmixError("--steps must be >= 1 and --guidance >= 0")
        if self.kind != "gen":
            from .plan import BETA_CLIP, denoising_steps

            lowest = (min(DA_FUSION_STRENGTHS) if self.mode == "da-fusion" else BETA_CLIP[0] if self.strength_beta
                      else min(self.strength_set or (self.strength,)))
            if denoising_steps(lowest, self.steps) < 1:
                raise DiffmixError(f"strength {lowest} x --steps {self.steps} is less than one denoising step: the "
                                   f"image would come back unchanged; raise the strength or --steps (>= "
                                   f"{math.ceil(1 / lowest)})")
        if self.compile_cache and not self.compile:
            raise DiffmixError("--compile-cache stores compiled kernels: it needs --compile")
        if self.batch_size < 1 or self.rows_per_shard < 1:
            raise DiffmixError("--batch-size and --rows-per-shard must be >= 1")
        if not 1 <= self.min_actors <= self.max_actors:
            raise DiffmixError(f"actors: need 1 <= --min-actors ({self.min_actors}) <= --max-actors ({self.max_actors})")
        if (self.gpus_per_actor or 0) < 0 or self.cpus_per_actor <= 0:
            raise DiffmixError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise DiffmixError(f"--jpeg-quality {self.jpeg_quality} must be in 1..100")
        if self.limit is not None and self.limit < 1:
            raise DiffmixError(f"--limit {self.limit} must be >= 1")

    def output_identity(self) -> dict:
        """The options that decide which images exist (the output's identity). Execution knobs
        (actors, batch size, ...) may change between a run and its resume."""
        keys = ("dataset", "model", "concepts", "mode", "multiplier", "per_image", "source_sampling",
                "target_sampling", "strength", "strength_set", "strength_beta", "seed", "steps", "guidance",
                "prompt_template", "jpeg_quality", "limit")
        return {k: getattr(self, k) for k in keys}
