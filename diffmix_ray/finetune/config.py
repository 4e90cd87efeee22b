"""Typed configuration of `finetune`, validated before any worker starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..contracts import DEFAULT_PROMPT_TEMPLATE, PLACEHOLDER_TEMPLATE
from ..errors import DiffmixError
from ..models.concepts import BANK_MODES

# The reference initialises every class token from CLIP BPE id 42170, the rare sub-word "ktn":
# rare, so the new tokens start close to "no meaning" instead of some common word's.
DEFAULT_INITIALIZER = "ktn"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# joint: one AdamW over every class token at every step (the Diff-Mix reference's one run); per-class:
# every step one class, only its token updated (DA-Fusion's separate runs; token_optim.py, sampling.py)
TOKEN_SCHEDULES = ("joint", "per-class")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every UNet attention q/k/v/out, as the reference

# Options that do not change the trained weights: they may differ between a run and its resume.
EXECUTION_KNOBS = ("out", "gpus_per_worker", "cpus_per_worker", "checkpoint_every", "checkpoints_to_keep",
                   "log_every", "max_failures", "gradient_checkpointing", "compile", "_fail_at_step")


@dataclass(frozen=True)
class FinetuneConfig:
    dataset: str
    out: str
    model: str = "tiny"
    mode: str = "ti+lora"  # ti+lora | ti | lora
    # what is trained
    rank: int = 10  # LoRA rank (the reference's LoRAAttnProcessor(rank=10))
    lora_alpha: float | None = None  # default = rank, i.e. LoRA scale 1 as in the reference
    initializer_token: str | None = None  # None: "ktn", or the mean of its pieces if it is not one token
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # optimisation (Diff-Mix defaults)
    lr: float = 5e-5  # LoRA learning rate
    ti_lr: float = 5e-5  # token-embedding learning rate
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    max_steps: int = 35000
    batch_size: int = 2  # per worker
    seed: int = 42
    token_schedule: str = "joint"  # joint | per-class (TOKEN_SCHEDULES)
    # p ∝ 1/n_c sampling, every class seen equally often in expectation; None: on for long-tailed
    # datasets (the paper's), off otherwise (run.resolve_inputs decides, prints and records it)
    class_balanced: bool | None = None
    precision: str = "auto"  # GPU: bf16 where supported, else fp16; CPU: fp32
    # execution
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 5000
    checkpoints_to_keep: int = 2
    log_every: int = 50  # also how often the loss is read back from the device (a host sync)
    max_failures: int = 3
    # Speed/memory trade-offs that leave the trained weights as they are (up to float rounding), so a
    # resume may change them. Both off by default: see docs/finetune.md for what they cost and give.
    gradient_checkpointing: bool = False  # UNet activations recomputed in backward: less memory, slower steps
    compile: bool = False  # torch.compile the UNet (in place): slow first steps, then faster ones
    _fail_at_step: int | None = None  # test hook: rank 1 dies once, just before this step

    @property
    def has_tokens(self) -> bool:
        return self.mode in ("ti+lora", "ti")

    @property
    def has_lora(self) -> bool:
        return self.mode in ("ti+lora", "lora")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.rank)

    @property
    def use_gpu(self) -> bool:
        return (self.gpus_per_worker or 0) > 0

    def validate(self) -> None:
        if self.mode not in BANK_MODES:
            raise DiffmixError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(BANK_MODES)} "
                               "(ti+lora: class tokens and UNet LoRA, the Diff-Mix default)")
        if self.rank <= 0:
            raise DiffmixError(f"--rank {self.rank} must be a positive LoRA rank (Diff-Mix uses 10)")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise DiffmixError(f"lora_alpha {self.lora_alpha} must be > 0 (default: the rank)")
        for flag, value in (("--lr", self.lr), ("--ti-lr", self.ti_lr)):
            if not value > 0:
                raise DiffmixError(f"{flag} {value} must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise DiffmixError("weight_decay must be >= 0 and max_grad_norm > 0")
        if self.max_steps < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise DiffmixError("--max-steps and --batch-size must be >= 1, warmup_steps >= 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.checkpoints_to_keep < 1:
            raise DiffmixError("--checkpoint-every, log_every and checkpoints_to_keep must be >= 1")
        if self.workers < 1 or self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0 or self.max_failures < 0:
            raise DiffmixError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0, "
                               "max_failures >= 0")
        if self.precision not in PRECISIONS:
            raise DiffmixError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.gpus_per_worker is not None and not self.use_gpu and self.precision in ("fp16", "bf16"):
            raise DiffmixError(f"precision {self.precision} needs GPUs (--gpus-per-worker > 0); CPU training "
                               "runs in fp32: use precision auto or fp32")
        if self.token_schedule not in TOKEN_SCHEDULES:
            raise DiffmixError(f"token_schedule {self.token_schedule!r}: choose {' or '.join(TOKEN_SCHEDULES)}")
        if self.token_schedule == "per-class" and self.mode != "ti":
            raise DiffmixError(f"token_schedule per-class trains each class's token on its own steps (DA-Fusion's "
                               f"separate runs); --mode {self.mode} also trains a LoRA shared by every class: use "
                               "--mode ti, or token_schedule joint")
        if self.token_schedule == "per-class" and self.class_balanced:
            raise DiffmixError("token_schedule per-class gives every class the same steps already; drop "
                               "--class-balanced")
        if self.initializer_token is not None and len(self.initializer_token.split()) != 1:
            raise DiffmixError(f"--initializer-token {self.initializer_token!r} must be one word without spaces")
        self._check_template()

    def _check_template(self) -> None:
        if "{token}" not in self.prompt_template:
            raise DiffmixError(f"--prompt-template {self.prompt_template!r} lacks {{token}}: the class token "
                               f"must appear in every prompt, e.g. {DEFAULT_PROMPT_TEMPLATE!r}")
        try:
            self.prompt_template.format(token="x", super_class="y")
        except (KeyError, IndexError, ValueError) as e:
            raise DiffmixError(f"--prompt-template {self.prompt_template!r} is not a valid template ({e}); "
                               "only {token} and {super_class} may appear in braces") from None

    def tokens(self, num_classes: int) -> list[str]:
        return [PLACEHOLDER_TEMPLATE.format(index=i) for i in range(num_classes)]

    def prompts(self, class_names: list[str], super_class: str) -> list[str]:
        """One training prompt per class: its placeholder token, or (LoRA only) its name."""
        words = self.tokens(len(class_names)) if self.has_tokens else class_names
        return [" ".join(self.prompt_template.format(token=w, super_class=super_class).split()) for w in words]

    def identity(self) -> dict:
        """The options that decide the trained weights: a resume must match them exactly."""
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_KNOBS}
        if ident["token_schedule"] == "joint":  # the schedule before the option existed: those runs resume
            del ident["token_schedule"]
        return ident
