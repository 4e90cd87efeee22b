"""Typed configuration of `generate` and `plan`, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..config import EXECUTION, option
from ..errors import DiffmixError
from ..runtime.pool_config import ActorPoolConfig

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


def floats(text: str, flag: str) -> tuple[float, ...]:
    """A comma-separated list of numbers from the command line."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DiffmixError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.3,0.5,0.7") from None
    if not values:  # an empty list would silently mean "not given"
        raise DiffmixError(f"{flag} {text!r} lists no number; give comma-separated numbers, e.g. 0.3,0.5,0.7")
    return values


@dataclass(frozen=True)
class GenerateConfig(ActorPoolConfig):
    OPTION_HELP: ClassVar[dict[str, str]] = {
        "actors": "Translation", "memory": "Host memory reserved per actor, so Ray does not over-pack nodes.",
        "gpus": "GPUs per actor (fractions pack several per GPU). Default: 1 when the Ray cluster has GPUs or its "
                "autoscaler can add them, else 0 (CPU, fp32).",
        "cpus": "CPUs per actor; on CPU the actor runs one single-threaded stream of device batches per CPU "
                "(default 1)."}
    dataset: str = option(help="Canonical dataset URI (from `prepare`).")
    model: str = option("tiny", help="Base model: sample (trained on the sample world) | tiny | bench | sd15 (random "
                       "weights) | a diffusers folder | s3://... (default tiny).")
    concepts: str | None = option(None, help="Concept bank URI (from `finetune`); needed by diff-* and da-fusion "
                                  "modes.")
    out: str = option("", identity=EXECUTION, help="Output URI for plan/, shards/, manifest.json, _SUCCESS.")
    mode: str = option("diff-mix", help="diff-mix (default) | diff-aug | diff-gen | real-mix | real-aug | real-gen "
                       "| da-fusion.")
    # volume: pairs = multiplier x train images, or per_image pairs for every train image
    # None: 5 (the paper's) when per_image is not given either
    multiplier: float | None = option(None, help="Pairs = multiplier x train images (default 5).")
    per_image: int | None = option(None, help="Instead: M pairs for every train image.")
    # None: per-image on long-tailed datasets (sources follow the long-tailed image distribution, as the
    # reference's long-tail generation), class-uniform otherwise (its default); run.resolve_inputs decides
    source_sampling: str | None = option(None, help="class-uniform (the reference's) | per-image (evenly over "
                                         "images: the long-tailed image distribution). Default: per-image on "
                                         "long-tailed datasets, class-uniform otherwise.")
    target_sampling: str = option("uniform", help="uniform | inverse-frequency (weights 1/(n_c+1), for long-tail).")
    # strength: fixed value, a set sampled uniformly, or Beta(a, b) clipped to [0.1, 0.9]
    strength: float = option(0.7, help="Fixed translation strength in (0, 1] (default 0.7).")
    strength_set: tuple[float, ...] | None = option(None, cli_type=str, parse=floats, help="Comma-separated "
                                                    "strengths sampled uniformly, e.g. 0.3,0.5,0.7,0.9.")
    strength_beta: tuple[float, float] | None = option(None, cli_type=str, parse=floats,
                                                       help="a,b: strength ~ Beta(a, b) clipped to [0.1, 0.9].")
    seed: int = option(0, help="Run seed: fixes the plan and every pair's noise (default 0).")
    # sampler (Diff-Mix defaults: DPM-Solver++ 25 steps, CFG 7.5)
    steps: int = option(25, help="DPM-Solver++ steps (default 25; img2img runs int(steps x strength)).")
    guidance: float = option(7.5, help="Classifier-free guidance scale (default 7.5).")
    # None: the concept bank's, else "a photo of a {name} {super_class}"
    prompt_template: str | None = option(None, help="Override the prompt, with {token} and {super_class}.")
    # execution (and the actor pool's options, ActorPoolConfig)
    batch_size: int = option(8, identity=EXECUTION, kw_only=True, help="Pairs per translation call (default 8).")
    rows_per_shard: int = option(1000, identity=EXECUTION, help="Images per Parquet shard (default 1000).")
    jpeg_quality: int = option(95, help="JPEG quality of generated images (default 95).")
    limit: int | None = option(None, help="Only the first N pairs of the plan (smoke runs).")
    compile: bool = option(False, identity=EXECUTION, flags=("--compile/--no-compile",),
                           help="torch.compile the UNet: minutes per actor at start, faster batches after (batches "
                                "are padded to --batch-size). Default off.")
    # shared by the actors: the first compiles, the rest load
    compile_cache: str | None = option(None, identity=EXECUTION, help="URI (folder or s3://) where the first actor "
                                       "stores its compiled kernels and the others load them, so they start warm. "
                                       "Needs --compile.")

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
        self.check_pool("--rows-per-shard", self.rows_per_shard)
        if not 1 <= self.jpeg_quality <= 100:
            raise DiffmixError(f"--jpeg-quality {self.jpeg_quality} must be in 1..100")
        if self.limit is not None and self.limit < 1:
            raise DiffmixError(f"--limit {self.limit} must be >= 1")
