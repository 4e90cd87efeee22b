"""The read side of the scores contract (written by `score`, read by `train-cls` and `report`): which
scores exist beside a generate output, whether they are complete, whether they were computed for
these very shards, and their rows lined up with the shards' rows. Only the contract (contracts.py)
is shared with `score`; nothing here imports that stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .console import logger
from .contracts import (COL_PAIR_ID, DEFAULT_SCORES_NAME, MANIFEST_JSON, SCORES_DIR, SCORES_SCHEMA, SUCCESS,
                        check_columns)
from .errors import DiffmixError
from .synthetic import SyntheticSet


@dataclass
class ScoresSet:
    uri: str
    name: str
    manifest: dict
    files: list[str]  # score file URIs, sorted
    complete: bool  # _SUCCESS is there

    @property
    def fingerprint(self) -> str:
        """Identifies the scores: the hash of score's identity (shards, dataset, CLIP, classifier),
        the config_hash of their _run.json. A classifier run records it beside its filter."""
        return storage.config_hash(self.manifest.get("identity", {}))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        columns = columns or SCORES_SCHEMA.names
        tables = [storage.read_parquet(uri, columns) for uri in self.files]
        if not tables:
            return pa.schema([SCORES_SCHEMA.field(c) for c in columns]).empty_table()
        return pa.concat_tables(tables)

    def summary(self) -> dict:
        """What a classifier run records about the scores it filtered on."""
        clip = self.manifest.get("clip") or {}
        classifier = self.manifest.get("classifier") or {}
        return {"name": self.name, "uri": self.uri, "fingerprint": self.fingerprint, "complete": self.complete,
                "clip": clip.get("spec"), "classifier": classifier.get("run")}


def scores_uri(synthetic: str, name: str = DEFAULT_SCORES_NAME) -> str:
    return storage.join(storage.normalize(synthetic), SCORES_DIR, name)


def score_names(synthetic: str) -> list[str]:
    """The scores runs beside a generate output (folders under scores/ with a manifest)."""
    root = storage.join(storage.normalize(synthetic), SCORES_DIR)
    return [n for n in storage.list_dir(root) if storage.exists(storage.join(root, n, MANIFEST_JSON))]


def is_scores_output(uri: str) -> bool:
    """Whether `uri` is a `score` output: like a generate output it holds a manifest.json, so report and
    others tell them apart by the manifest's content, not by its presence."""
    manifest = read_manifest(uri)
    return manifest is not None and "synthetic_fingerprint" in manifest and "columns" in manifest


def read_manifest(uri: str) -> dict | None:
    """The manifest.json of the scores (or other output) at `uri`; None where there is none."""
    manifest_uri = storage.join(uri, MANIFEST_JSON)
    return storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None


def score_command(synthetic: str, name: str) -> str:
    """The command that writes scores `name` for `synthetic`, for error messages."""
    return (f"diffmix-ray score --synthetic {synthetic} --clip CLIP"
            + (f" --name {name}" if name != DEFAULT_SCORES_NAME else ""))


def open_scores(syn: SyntheticSet, name: str = DEFAULT_SCORES_NAME, allow_incomplete: bool = False,
                use: str = "--synthetic-filter") -> ScoresSet:
    """Open the scores `name` of a generate output for reading. Refuses scores that are not there
    (naming the `score` command that writes them), scores computed for other shards (by the shards'
    fingerprint), and incomplete scores (no _SUCCESS) unless `allow_incomplete`."""
    uri = scores_uri(syn.uri, name)
    if (manifest := read_manifest(uri)) is None:
        present = score_names(syn.uri)
        have = (f"; it has scores {', '.join(present)} (pick one with --scores NAME)" if present
                else "; it has no scores yet")
        raise DiffmixError(f"{use} reads the scores {uri}, which do not exist{have}. Score the shards first: "
                           f"`{score_command(syn.uri, name)}` (CLIP: a CLIPModel folder or s3:// copy, or tiny)")
    made_for = manifest.get("synthetic_fingerprint")
    if made_for != syn.fingerprint:
        raise DiffmixError(f"scores {uri} were computed for other shards (fingerprint {str(made_for)[:12]}; the shards "
                           f"in {syn.uri} now have {syn.fingerprint[:12]}: generate was run there again with another "
                           f"config). Score these shards again: `{score_command(syn.uri, name)} --overwrite`")
    files = [storage.join(uri, n) for n in storage.list_dir(uri) if n.endswith(".parquet")]
    complete = storage.exists(storage.join(uri, SUCCESS))
    scores = ScoresSet(uri, name, manifest, files, complete)
    if not complete:
        counts = manifest.get("counts", {})
        what = (f"{counts.get('scored', '?')} of {counts.get('pairs', '?')} pairs scored "
                f"({counts.get('failed', 0)} failed)")
        if not allow_incomplete:
            raise DiffmixError(f"scores {uri} are incomplete (no {SUCCESS}): {what}. Rerun "
                               f"`{score_command(syn.uri, name)}` to finish them, or pass --allow-incomplete (pairs "
                               "without a score are never kept)")
        logger.warning("using incomplete scores %s: %s; pairs without a score are never kept", uri, what)
    if files:
        fs, path = storage.arrow_filesystem(files[0])
        check_columns(pq.read_schema(path, filesystem=fs), SCORES_SCHEMA, files[0])
    return scores


def align(scores: pa.Table, pair_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each of `pair_ids` (the shards' rows, in order), the row of `scores` holding its score,
    or -1 where it has none."""
    index = pc.index_in(pair_ids, value_set=scores.column(COL_PAIR_ID).combine_chunks())
    return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
