"""Typed configuration of `score`, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..contracts import DEFAULT_SCORES_NAME, SCORES_NAME_PATTERN
from ..errors import DiffmixError
from ..runtime.pool_config import ActorPoolConfig

_NAME = re.compile(SCORES_NAME_PATTERN)  # one folder under <synthetic>/scores/


@dataclass(frozen=True)
class ScoreConfig(ActorPoolConfig):
    synthetic: str  # a generate output
    clip: str  # preset (tiny, clip-b32), CLIPModel folder, s3:// copy, or hub id org/name
    classifier: str | None = None  # a finished train-cls output: adds its class probabilities
    name: str = DEFAULT_SCORES_NAME  # scores go to <synthetic>/scores/<name>/
    dataset: str | None = None  # default: the dataset generate recorded (same fingerprint required)
    allow_incomplete: bool = False  # score shards without _SUCCESS
    # execution (and the actor pool's options, ActorPoolConfig)
    batch_size: int = field(default=64, kw_only=True)  # images per scoring call
    rows_per_file: int = 100_000  # scores per Parquet file (~25 bytes each); a killed run redoes at most this many
    _batch_delay_s: float = 0.0  # test hook: the actor sleeps this long per batch, so a kill lands mid-run

    def validate(self) -> None:
        if not _NAME.match(self.name or ""):
            raise DiffmixError(f"--name {self.name!r} must be a folder name: letters, digits, '.', '_' and '-', "
                               "not starting with '.' or '-'")
        self.check_pool("--rows-per-file", self.rows_per_file)
