"""The read side of the synthetic-shard contract (written by `generate`, read by `train-cls` and
`report`): which shards exist, whether the set is complete, and what made it."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from . import storage
from .contracts import MANIFEST_JSON, SHARD_SCHEMA, SHARDS_DIR, SUCCESS, check_columns
from .errors import DiffmixError


@dataclass
class SyntheticSet:
    uri: str
    manifest: dict
    files: list[str]  # shard URIs, sorted
    complete: bool

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset_fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Identifies the generation: the hash of generate's identity (dataset, model, concept bank
        and every option that decides the images). Same fingerprint, same image for each pair_id;
        scores carry it so that they are never applied to other shards."""
        return storage.config_hash(self.manifest.get("identity", {}))

    @property
    def missing(self) -> int:
        return int(self.manifest.get("counts", {}).get("missing", 0))

    def read(self, columns: list[str]):
        import pyarrow as pa

        tables = [storage.read_parquet(uri, columns) for uri in self.files]
        return pa.concat_tables(tables) if tables else pa.schema([SHARD_SCHEMA.field(c) for c in columns]).empty_table()


PARQUET_MAGIC = b"PAR1"


def shard_records(shards: str, found: dict[str, list[str]]) -> dict[str, dict]:
    """What the manifest records of each shard file (its rows and bytes), so that a later reader
    can tell a shard cut short or replaced from the one generate wrote."""
    sizes = storage.file_sizes(shards)
    return {name: {"rows": len(ids), "bytes": sizes[name]} for name, ids in sorted(found.items())}


def damaged_shards(uri: str, manifest: dict) -> dict[str, str]:
    """Shard file -> what is wrong with it, for a generate output said to be complete: missing, not
    the size the manifest records, not in the manifest, or without a Parquet footer. One listing and
    one small ranged read per file (the footer's magic); outputs from before the manifest recorded
    files get the footer check only."""
    from concurrent.futures import ThreadPoolExecutor

    shards = storage.join(uri, SHARDS_DIR)
    sizes = {n: s for n, s in storage.file_sizes(shards).items() if n.endswith(".parquet")}
    recorded = manifest.get("shard_files")
    problems: dict[str, str] = {}
    if recorded is not None:
        for name, rec in recorded.items():
            if name not in sizes:
                problems[name] = "missing"
            elif sizes[name] != rec.get("bytes"):
                problems[name] = f"size {sizes[name]} bytes, {rec.get('bytes')} in the manifest"
        problems.update({n: "not in the manifest" for n in sizes if n not in recorded})
    names = sorted(n for n in sizes if n not in problems)
    with ThreadPoolExecutor(16) as pool:
        tails = list(pool.map(lambda n: storage.read_tail(storage.join(shards, n), sizes[n], 4), names))
    problems.update({n: "no Parquet footer (cut short)" for n, tail in zip(names, tails) if tail != PARQUET_MAGIC})
    return dict(sorted(problems.items()))


def describe_damage(problems: dict[str, str]) -> str:
    first = next(iter(problems))
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return f"{first} ({problems[first]}){more}"


def open_synthetic(uri: str, dataset_fingerprint: str, allow_incomplete: bool = False,
                   use: str = "train on") -> SyntheticSet:
    """Open a generate output for reading; refuse one made from another dataset, and an incomplete
    one (no _SUCCESS) unless `allow_incomplete`. `use` words the fix ("train on", "score")."""
    uri = storage.normalize(uri)
    storage.check_bucket(uri)
    manifest_uri = storage.join(uri, MANIFEST_JSON)
    if not storage.exists(manifest_uri):
        raise DiffmixError(f"{uri} holds no {MANIFEST_JSON}: it is not a `diffmix-ray generate` output "
                           "(or generate has not finished once); run generate there first")
    manifest = storage.read_json(manifest_uri)
    made_from = manifest.get("dataset_fingerprint")
    if made_from != dataset_fingerprint:
        raise DiffmixError(f"synthetic shards {uri} were generated from another dataset (fingerprint "
                           f"{str(made_from)[:12]}, --dataset has {dataset_fingerprint[:12]}); pass the dataset "
                           "they were made from, or generate again from this one")
    shards = storage.join(uri, SHARDS_DIR)
    files = [storage.join(shards, n) for n in storage.list_dir(shards) if n.endswith(".parquet")]
    complete = storage.exists(storage.join(uri, SUCCESS))
    syn = SyntheticSet(uri, manifest, files, complete)
    if not complete:
        counts = manifest.get("counts", {})
        what = (f"{counts.get('missing', '?')} of {counts.get('planned', '?')} planned pairs are missing "
                f"({counts.get('failed', 0)} failed)")
        if not allow_incomplete:
            raise DiffmixError(f"synthetic shards {uri} are incomplete (no {SUCCESS}): {what}. Rerun generate to "
                               f"finish them, or pass --allow-incomplete to {use} what exists")
        from .console import logger

        logger.warning("using incomplete synthetic shards %s: %s", uri, what)
    if complete and (damaged := damaged_shards(uri, manifest)):
        raise DiffmixError(f"synthetic shards {uri} are damaged: {describe_damage(damaged)}; rerun the generate "
                           f"command that made them (it checks its shards and redoes the damaged ones), then {use} "
                           "them")
    if files:
        fs, path = storage.arrow_filesystem(files[0])
        check_columns(pq.read_schema(path, filesystem=fs), SHARD_SCHEMA, files[0])
    return syn
