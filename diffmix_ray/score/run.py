"""`score` as an actor-pool stage (runtime/pool_stage.py runs it): its inputs (synthetic shards,
the dataset they came from, CLIP, optionally a classifier), its output <synthetic>/scores/<name>, its
plan (the pairs of the shards), where each pair's synthetic and source image are, its steps (read +
decode + resize -> scoring actor -> cast) and its manifest. The shards are only ever read.

Exactly-once comes from diffmix_ray/exactly_once.py through the driver, as for `generate`: score
files are appended beside the others, a rerun deletes files cut short, compacts duplicated pairs,
scores only what is missing, and writes _SUCCESS when every pair of the shards has exactly one score."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from .. import canonical, config, storage
from ..console import logger
from ..contracts import (CLASS_PROMPT, COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL,
                         RUN_JSON, SCORE_COLUMNS, SCORES_DIR, SCORES_SCHEMA, SCORES_VERSION, object_prompts)
from ..errors import DiffmixError
from ..models.clip import ClipRef, resolve_clip
from ..runtime.pool_stage import Outcome, PoolStage, Step, Steps, run_pool_stage
from ..synthetic import SyntheticSet, open_with_dataset
from .classifier import ClassifierRun, open_classifier
from .config import ScoreConfig
from .cpu_stages import COL_SRC_FILE, COL_SRC_ROW, COL_SYN_FILE, COL_SYN_ROW, finish_scores, prepare_images

BLOCK_ROWS = 1024  # rows per plan block: about a generate shard, whose row groups a block reads once
READ_THREADS = 16  # concurrent reads of the shards' key columns when planning
VERSIONED = ("diffmix-ray", "ray", "torch", "transformers", "timm", "pyarrow")


@dataclasses.dataclass
class Inputs:
    cfg: ScoreConfig
    out: str
    synthetic: SyntheticSet
    dataset: canonical.Dataset
    clip: ClipRef
    classifier: ClassifierRun | None
    identity: dict


def resolve_inputs(cfg: ScoreConfig) -> Inputs:
    """Validate the config and every input before any output is touched."""
    cfg.validate()
    dataset, synthetic = open_with_dataset(cfg.synthetic, cfg.dataset, cfg.allow_incomplete, use="score",
                                           flag="--synthetic")
    clip = resolve_clip(cfg.clip)
    info = dataset.info
    classifier = open_classifier(cfg.classifier, info.fingerprint, info.num_classes) if cfg.classifier else None
    identity = config.identity(cfg) | {
        "scores_version": SCORES_VERSION, "synthetic_fingerprint": synthetic.fingerprint,
        "dataset_fingerprint": info.fingerprint, "clip_fingerprint": clip.fingerprint,
        "classifier_fingerprint": classifier.fingerprint if classifier else None}
    out = storage.join(synthetic.uri, SCORES_DIR, cfg.name)
    return Inputs(cfg, out, synthetic, dataset, clip, classifier, identity)


def _read_keys(uri: str, complete: bool) -> pa.Table | None:
    try:
        return storage.read_parquet(uri, [COL_PAIR_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL])
    except DiffmixError as e:
        if complete:
            raise DiffmixError(f"shard {uri} of a complete generate output is unreadable ({e}); the output is "
                               "damaged: rerun generate there") from None
        logger.warning("skipping shard %s, unreadable (being written, or cut short): %s", uri, e)
        return None


def build_plan(inputs: Inputs) -> pa.Table:
    """One row per pair of the shards (the first copy, should an incomplete output hold two): key
    columns and where its synthetic image is (shard file, row). The shards' small key columns are
    read concurrently: thousands of files on S3 cost requests' latency, not bandwidth."""
    from concurrent.futures import ThreadPoolExecutor

    files = inputs.synthetic.files
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = list(pool.map(lambda uri: _read_keys(uri, inputs.synthetic.complete), files))
    parts = [t.append_column(COL_SYN_FILE, pa.array(np.full(t.num_rows, f), pa.int32()))
             .append_column(COL_SYN_ROW, pa.array(np.arange(t.num_rows), pa.int64()))
             for f, t in enumerate(tables) if t is not None]
    if not parts:
        raise DiffmixError(f"{inputs.synthetic.uri} holds no readable shard: nothing to score")
    plan = pa.concat_tables(parts)
    plan = plan.append_column("_i", pa.array(np.arange(plan.num_rows), pa.int64()))
    first = plan.group_by(COL_PAIR_ID, use_threads=False).aggregate([("_i", "min")]).column("_i_min").to_numpy()
    return plan.take(pa.array(np.sort(first))).drop_columns(["_i"])


class ScoreStage(PoolStage):
    """`score` as an actor-pool stage: the pairs of the shards in, one row of scores per pair out."""

    name, verb = "score", "scored"
    file_prefix, file_word, row_words, missing_words = "scores", "score file(s)", "scored pairs", "pairs have no score"
    schema = SCORES_SCHEMA
    block_group = COL_SYN_FILE  # a block reads whole row groups of the shards it touches: never one shard twice
    versioned = VERSIONED

    def __init__(self, inputs: Inputs) -> None:
        cfg = inputs.cfg
        # A block is at most about a generate shard (BLOCK_ROWS), and never more than a score file.
        super().__init__(cfg, inputs.out, inputs.out, inputs.identity, cfg.rows_per_file,
                         min(BLOCK_ROWS, cfg.rows_per_file))
        self.inputs = inputs
        # Scores of an incomplete generate output whose generate, resumed, is redoing a shard may
        # name pairs the shards no longer hold.
        self.refuse_extra = inputs.synthetic.complete

    def input_uris(self) -> storage.Inputs:
        return {"--dataset": self.inputs.dataset.uri, "--clip": self.inputs.clip.location,
                "--classifier": self.cfg.classifier}

    def shared_inputs(self) -> list[tuple[str, str | None]]:
        cfg = self.cfg
        return [("--synthetic", cfg.synthetic), ("--dataset", self.inputs.dataset.uri), ("--clip", cfg.clip),
                ("--classifier", cfg.classifier)]

    def make_plan(self) -> pa.Table:
        return build_plan(self.inputs)

    def complete(self, manifest: dict) -> str | None:
        """Complete for the shards as they are now: an incomplete generate output that has grown
        since gets its new pairs scored."""
        same = (manifest.get("synthetic_complete") == self.inputs.synthetic.complete
                and manifest.get("counts", {}).get("pairs") == self.plan.num_rows)
        return f"{manifest['counts']['scored']} pairs scored" if same else None

    def locate(self, todo: pa.Table) -> pa.Table:
        """With the train-split file and row of each pair's source image (-1: none), ordered by
        shard file and row. A source the dataset lacks is refused."""
        dataset = self.inputs.dataset
        sources = todo.column(COL_SOURCE_ID).to_pylist()
        files, rows = dataset.locate("train", sources)
        for pair, source, f in zip(todo.column(COL_PAIR_ID).to_pylist(), sources, files):
            if source is not None and f < 0:
                raise DiffmixError(f"pair {pair}'s source image {source!r} is not in the train split of {dataset.uri}")
        todo = todo.append_column(COL_SRC_FILE, pa.array(files)).append_column(COL_SRC_ROW, pa.array(rows))
        return todo.sort_by([(COL_SYN_FILE, "ascending"), (COL_SYN_ROW, "ascending")])

    def _classifier_cfg(self) -> dict | None:
        return self.inputs.classifier.data_cfg if self.inputs.classifier else None

    def row_bytes(self) -> int:
        h, w = self.inputs.clip.prep.output_hw
        cls_cfg = self._classifier_cfg()
        return 2 * h * w * 3 + (3 * cls_cfg["img_size"] ** 2 if cls_cfg else 0)

    def steps(self, gpus: float, chunk_rows: int) -> Steps:
        from .scorer import Scorer  # torch: only the driver of a run with work loads it

        cfg, inputs, classifier = self.cfg, self.inputs, self.inputs.classifier
        info = inputs.dataset.info
        before = Step(prepare_images, dict(syn_files=inputs.synthetic.files, src_files=inputs.dataset.files("train"),
                                           clip_prep=dataclasses.asdict(inputs.clip.prep),
                                           cls_cfg=self._classifier_cfg()))
        scorer = dict(clip=cfg.clip, class_names=info.classes, super_class=info.super_class,
                      classifier=classifier.uri if classifier else None,
                      classifier_fingerprint=classifier.fingerprint if classifier else None,
                      batch_delay_s=cfg._batch_delay_s)
        return Steps(before, Scorer, scorer, cfg.batch_size, Step(finish_scores))

    def plan_line(self, plan: pa.Table, done: set[str], todo: pa.Table) -> str:
        return (f"score: {plan.num_rows} pairs in {len(self.inputs.synthetic.files)} shards; already scored "
                f"{len(done & set(plan.column(COL_PAIR_ID).to_pylist()))}; to do {todo.num_rows}")

    def describe(self, outcome: Outcome) -> dict:
        inputs, info = self.inputs, self.inputs.dataset.info
        return {
            "synthetic": inputs.synthetic.uri, "synthetic_fingerprint": inputs.synthetic.fingerprint,
            "synthetic_complete": inputs.synthetic.complete,
            "dataset": inputs.dataset.uri, "dataset_fingerprint": info.fingerprint,
            "clip": {"spec": inputs.clip.spec, "kind": inputs.clip.kind, "fingerprint": inputs.clip.fingerprint},
            "classifier": inputs.classifier.summary() if inputs.classifier else None,
            "prompts": {"class": CLASS_PROMPT, "object": list(object_prompts(info.super_class))},
            "columns": list(SCORE_COLUMNS),
            "counts": {"pairs": outcome.plan.num_rows, "scored": self._scored(outcome), "missing": len(outcome.missing),
                       "failed": len(outcome.failures), "files": len(outcome.after.found), "bytes": outcome.bytes,
                       "duplicates_removed": outcome.duplicates_removed,
                       "unreadable_files_removed": outcome.unreadable_removed}}

    @staticmethod
    def _scored(outcome: Outcome) -> int:
        return len(outcome.after.done & set(outcome.plan.column(COL_PAIR_ID).to_pylist()))

    def summary(self, outcome: Outcome) -> str:
        failed = len(outcome.failures)
        return (f"{self._scored(outcome)}/{outcome.plan.num_rows} pairs in {len(outcome.after.found)} files"
                + (f"; {failed} failed" if failed else ""))


def _check_name_free(inputs: Inputs, overwrite: bool) -> None:
    """Scores of another config under this name: say so in score's terms (storage.claim_output, which
    would refuse too, speaks of --out)."""
    run_json = storage.join(inputs.out, RUN_JSON)
    if overwrite or not storage.exists(run_json):
        return
    have = storage.read_json(run_json)
    if have.get("stage") == "score" and have.get("config_hash") != storage.config_hash(inputs.identity):
        changed = [k for k, v in inputs.identity.items() if have.get("config", {}).get(k) != v]
        raise DiffmixError(f"{inputs.out} holds scores of a different config (other {', '.join(changed)}): pass "
                           f"--name NEW to keep both, or --overwrite to replace them")


def run_score(cfg: ScoreConfig, overwrite: bool = False) -> dict:
    """Score every pair of the shards that has no score yet; returns the manifest."""
    started = time.perf_counter()
    inputs = resolve_inputs(cfg)
    _check_name_free(inputs, overwrite)
    return run_pool_stage(ScoreStage(inputs), overwrite, started)
