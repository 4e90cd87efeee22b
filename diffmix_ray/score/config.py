"""Typed configuration of `score`, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..contracts import DEFAULT_SCORES_NAME, SCORES_NAME_PATTERN
from ..errors import DiffmixError

_NAME = re.compile(SCORES_NAME_PATTERN)  # one folder under <synthetic>/scores/


@dataclass(frozen=True)
class ScoreConfig:
    synthetic: str  # a generate output
    clip: str  # preset (tiny, clip-b32), CLIPModel folder, s3:// copy, or hub id org/name
    classifier: str | None = None  # a finished train-cls output: adds its class probabilities
    name: str = DEFAULT_SCORES_NAME  # scores go to <synthetic>/scores/<name>/
    dataset: str | None = None  # default: the dataset generate recorded (same fingerprint required)
    allow_incomplete: bool = False  # score shards without _SUCCESS
    # execution
    batch_size: int = 64
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the Ray cluster has (or can add) GPUs, else 0
    cpus_per_actor: float = 1.0
    memory_per_actor_gb: float | None = None
    rows_per_file: int = 100_000  # scores per Parquet file (~25 bytes each); a killed run redoes at most this many
    _batch_delay_s: float = 0.0  # test hook: the actor sleeps this long per batch, so a kill lands mid-run

    def validate(self) -> None:
        if not _NAME.match(self.name or ""):
            raise DiffmixError(f"--name {self.name!r} must be a folder name: letters, digits, '.', '_' and '-', "
                               "not starting with '.' or '-'")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise DiffmixError("--batch-size and --rows-per-file must be >= 1")
        if not 1 <= self.min_actors <= self.max_actors:
            raise DiffmixError(f"actors: need 1 <= --min-actors ({self.min_actors}) <= --max-actors "
                               f"({self.max_actors})")
        if (self.gpus_per_actor or 0) < 0 or self.cpus_per_actor <= 0:
            raise DiffmixError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
