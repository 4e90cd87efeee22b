"""Typed configuration of `score`, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..config import EXECUTION, INPUT, option
from ..contracts import DEFAULT_SCORES_NAME, SCORES_NAME_PATTERN
from ..errors import DiffmixError
from ..runtime.pool_config import ActorPoolConfig

_NAME = re.compile(SCORES_NAME_PATTERN)  # one folder under <synthetic>/scores/


# Identity: what decides the scores is the inputs' fingerprints (shards, dataset, CLIP, classifier),
# which run.py adds; the options themselves are inputs or execution knobs.
@dataclass(frozen=True)
class ScoreConfig(ActorPoolConfig):
    OPTION_HELP: ClassVar[dict[str, str]] = {
        "actors": "Scoring", "cpus": "CPUs per actor; on CPU also its torch threads (default 1).",
        "gpus": ActorPoolConfig.OPTION_HELP["gpus"], "memory": "Host memory reserved per actor."}
    synthetic: str = option(identity=INPUT,
                            help="A generate output (local path or s3://) whose shards to score.")
    clip: str = option(identity=INPUT, help="CLIP model: sample (trained on the sample world) | tiny | "
                       "clip-b32 (random weights, for tests and benchmarks) | a CLIPModel folder | s3://... | a hub id org/name (only when online).")
    classifier: str | None = option(None, identity=INPUT, help="A finished train-cls run: adds its softmax "
                                    "probability of the source and the target class.")
    name: str = option(DEFAULT_SCORES_NAME, identity=EXECUTION,
                       help="Scores go to <synthetic>/scores/NAME/ (default 'default').")
    dataset: str | None = option(None, identity=INPUT, help="The canonical dataset the shards were made from "
                                 "(default: the one generate recorded; its fingerprint must match).")
    allow_incomplete: bool = option(False, identity=EXECUTION, flags=("--allow-incomplete",),
                                    help="Score shards without _SUCCESS.")
    # execution (and the actor pool's options, ActorPoolConfig)
    batch_size: int = option(64, identity=EXECUTION, kw_only=True, help="Images per scoring call (default 64).")
    # ~25 bytes a score; a killed run redoes at most this many
    rows_per_file: int = option(100_000, identity=EXECUTION, help="Scores per Parquet file (default 100000).")
    _batch_delay_s: float = 0.0  # test hook: the actor sleeps this long per batch, so a kill lands mid-run

    def validate(self) -> None:
        if not _NAME.match(self.name or ""):
            raise DiffmixError(f"--name {self.name!r} must be a folder name: letters, digits, '.', '_' and '-', "
                               "not starting with '.' or '-'")
        self.check_pool("--rows-per-file", self.rows_per_file)
