"""Typed configuration of `finetune`, validated before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config
from ..config import EXECUTION, UNLESS_DEFAULT, option
from ..contracts import DEFAULT_PROMPT_TEMPLATE, PLACEHOLDER_TEMPLATE
from ..errors import DiffmixError

# The reference initialises every class token from CLIP BPE id 42170, the rare sub-word "ktn":
# rare, so the new tokens start close to "no meaning" instead of some common word's.
DEFAULT_INITIALIZER = "ktn"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# joint: one AdamW over every class token at every step (the Diff-Mix reference's one run); per-class:
# every step one class, only its token updated (DA-Fusion's separate runs; token_optim.py, sampling.py)
TOKEN_SCHEDULES = ("joint", "per-class")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every UNet attention q/k/v/out, as the reference

# Identity: every option decides the trained weights unless marked EXECUTION (may differ between a run and
# its resume: where it runs, how often it saves, speed/memory trade-offs that leave the weights as they are).
@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    dataset: str = option(help="Canonical dataset URI (from `prepare`); reads its train split.")
    model: str = option("tiny", help="Base model: sample | tiny | bench | sd15 | a diffusers folder | s3://...")
    out: str = option(identity=EXECUTION, help="Output URI: the concept bank at its root, checkpoints under train/.")
    mode: str = option("ti+lora", help="ti+lora (default: class tokens + UNet LoRA) | ti | lora.")
    # what is trained
    rank: int = option(10, help="LoRA rank (default 10).")  # the reference's LoRAAttnProcessor(rank=10)
    # optimisation (Diff-Mix defaults)
    lr: float = option(5e-5, help="LoRA learning rate (default 5e-5).")
    ti_lr: float = option(5e-5, help="Class-token embedding learning rate (default 5e-5).")
    max_steps: int = option(35000, help="Optimizer steps (default 35000, the reference's).")
    batch_size: int = option(2, help="Images per worker per step (default 2).")
    # execution
    workers: int = option(1, help="Data-parallel training workers (default 1).")
    # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    gpus_per_worker: float | None = option(None, identity=EXECUTION, help="GPUs per worker. Default: 1 when the Ray "
                                           "cluster has GPUs or its autoscaler can add them, else 0 (CPU, fp32).")
    cpus_per_worker: float = option(1.0, identity=EXECUTION,
                                    help="CPUs per worker (= torch threads on CPU; default 1).")
    checkpoint_every: int = option(5000, identity=EXECUTION, help="Checkpoint every N steps (default 5000).")
    seed: int = option(42, help="Seed of the LoRA init and the noise (default 42).")
    # None: "ktn", or the mean of its pieces if it is not one token
    initializer_token: str | None = option(None, help="Word every class token starts from; must be one token "
                                           "(default 'ktn', averaged over its pieces if the tokenizer splits it).")
    prompt_template: str = option(DEFAULT_PROMPT_TEMPLATE, help="Training prompt with {token} and {super_class} "
                                  "(default 'a photo of a {token} {super_class}').")
    # p ∝ 1/n_c sampling, every class seen equally often in expectation; None: on for long-tailed
    # datasets (the paper's), off otherwise (run.resolve_inputs decides, prints and records it)
    class_balanced: bool | None = option(None, flags=("--class-balanced/--no-class-balanced",),
                                         help="Draw images with p ∝ 1/n_c, every class equally often in expectation "
                                              "(default: on for long-tailed datasets, the paper's; off otherwise).")
    # joint: the schedule before the option existed, so those runs (joint) keep their identity and resume
    token_schedule: str = option("joint", identity=UNLESS_DEFAULT, help="joint (default: one AdamW over every token "
                                 "each step, the Diff-Mix reference) | per-class (--mode ti: each step one class, "
                                 "only its token updated: DA-Fusion's separate runs).")
    # Speed/memory trade-offs that leave the trained weights as they are (up to float rounding), so a
    # resume may change them. Both off by default: see docs/finetune.md for what they cost and give.
    gradient_checkpointing: bool = option(
        False, identity=EXECUTION, flags=("--gradient-checkpointing/--no-gradient-checkpointing",),
        help="Recompute the UNet's activations in backward: less GPU memory, slower steps (default off).")
    compile: bool = option(False, identity=EXECUTION, flags=("--compile/--no-compile",),
                           help="torch.compile the UNet: compiles during the first steps, then runs faster ones "
                                "(default off).")
    # YAML and Python only
    lora_alpha: float | None = option(None, cli=False, help="LoRA alpha (default: the rank, i.e. LoRA scale 1 as in "
                                      "the reference).")
    weight_decay: float = option(1e-2, cli=False, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, cli=False, help="Gradient clipping norm.")
    warmup_steps: int = option(0, cli=False, help="Linear warm-up steps.")
    precision: str = option("auto", cli=False, help="auto (GPU: bf16 where supported, else fp16; CPU: fp32) | fp32 "
                            "| fp16 | bf16.")
    checkpoints_to_keep: int = option(2, identity=EXECUTION, cli=False, help="Checkpoints kept under train/.")
    # also how often the loss is read back from the device (a host sync)
    log_every: int = option(50, identity=EXECUTION, cli=False, help="Steps between loss logs.")
    max_failures: int = option(3, identity=EXECUTION, cli=False, help="Worker failures Ray Train survives.")
    _fail_at_step: int | None = None  # test hook: rank 1 dies once, just before this step
    _hold_at_step: int | None = None  # test hook: rank 0 waits once, just before this step, for its node to die

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
        from ..models.concepts import BANK_MODES  # models imports diffusers: not when the CLI only parses

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
        return config.identity(self)
