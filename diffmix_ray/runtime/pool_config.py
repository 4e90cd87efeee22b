"""The options every actor-pool stage (generate, score) shares: how many actors, what each holds,
how many rows one actor call takes. Execution knobs only: none of them decides what a stage writes,
so none enters an output's identity, and a run may resume with other values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import EXECUTION, option
from ..errors import DiffmixError



# kw_only: a stage's config declares its own required options (dataset, synthetic...) first, as
# before; these come after them whatever their place in the class hierarchy. In --help they follow
# the stage's --batch-size.
@dataclass(frozen=True, kw_only=True)
class ActorPoolConfig:
    # The words of the help below that each stage says its own way ({actors}: "Translation"...).
    OPTION_HELP: ClassVar[dict[str, str]] = {
        "actors": "Pool", "gpus": "GPUs per actor. Default: 1 when the Ray cluster has GPUs or its autoscaler can "
        "add them, else 0 (CPU, fp32).", "cpus": "CPUs per actor (default 1).",
        "memory": "Host memory reserved per actor."}
    batch_size: int  # rows per actor call; each stage sets its own default (and help)
    min_actors: int = option(1, identity=EXECUTION, after="batch_size",
                             help="{actors} actors, autoscaling minimum (default 1).")
    max_actors: int = option(1, identity=EXECUTION, after="batch_size",
                             help="{actors} actors, autoscaling maximum (default 1).")
    # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    gpus_per_actor: float | None = option(None, identity=EXECUTION, after="batch_size", help="{gpus}")
    cpus_per_actor: float = option(1.0, identity=EXECUTION, after="batch_size", help="{cpus}")
    memory_per_actor_gb: float | None = option(None, identity=EXECUTION, after="batch_size", help="{memory}")

    def check_pool(self, rows_flag: str, rows_per_file: int) -> None:
        """The pool's options (and the stage's rows per output file, named by its flag)."""
        if self.batch_size < 1 or rows_per_file < 1:
            raise DiffmixError(f"--batch-size and {rows_flag} must be >= 1")
        if not 1 <= self.min_actors <= self.max_actors:
            raise DiffmixError(f"actors: need 1 <= --min-actors ({self.min_actors}) <= --max-actors "
                               f"({self.max_actors})")
        if (self.gpus_per_actor or 0) < 0 or self.cpus_per_actor <= 0:
            raise DiffmixError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")

    def actor_resources(self, gpus: float) -> dict:
        """Ray's resource arguments of one actor, with the GPUs the stage resolved."""
        remote = {"num_gpus": gpus, "num_cpus": self.cpus_per_actor}
        if self.memory_per_actor_gb:
            remote["memory"] = int(self.memory_per_actor_gb * 2**30)
        return remote
