"""Writing a canonical dataset root, shared by `prepare` (from raw) and `derive` (from a parent):
claim the output, write the shards, and write dataset.json last as the commit point."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from .. import canonical, storage
from ..console import logger
from ..contracts import COL_IMAGE, COL_IMAGE_ID, COL_LABEL, DATASET_JSON, IMAGES_DIR, SPLITS, DatasetInfo


def claim(out: str, config: dict[str, Any], overwrite: bool, inputs: storage.Inputs) -> DatasetInfo | None:
    """Claim `out` for this prepare config; returns the dataset already there when the same config
    completed it before (a rerun is a no-op), else None. Shards of an unfinished attempt are
    disposable: every attempt rewrites images/ before dataset.json, so they are never resumed."""
    resumed = storage.claim_output(out, "prepare", config, overwrite, disposable=(IMAGES_DIR,), inputs=inputs)
    meta = storage.join(out, DATASET_JSON)
    if resumed and storage.exists(meta):
        logger.info("%s already holds this dataset (same config); nothing to do", out)
        return DatasetInfo.from_json(storage.read_text(meta), where=meta)
    return None


def write(out: str, name: str, classes: list[str], super_class: str, by_split: dict[str, pa.Table],
          source: dict, subset: dict, skipped: dict, config: dict, parent_fingerprint: str | None,
          shot_thresholds: dict[str, int]) -> DatasetInfo:
    """Write the shards and dataset.json. A split with no rows gets no entry in `counts` or `files`
    at all (never an empty one): readers treat an absent split as absent, whatever its name."""
    storage.remove_tree(storage.join(out, IMAGES_DIR))  # leftovers of an interrupted attempt
    files, counts, digests = {}, {}, []
    for split in SPLITS:
        table = by_split.get(split)
        if table is None or table.num_rows == 0:
            continue
        files[split] = canonical.write_split_shards(out, split, table)
        labels = table.column(COL_LABEL).to_pylist()
        counts[split] = {str(c): n for c, n in sorted(Counter(labels).items())}
        digests += [canonical.row_digest(i, img, lab, split) for i, img, lab in
                    zip(table.column(COL_IMAGE_ID).to_pylist(), table.column(COL_IMAGE).to_pylist(), labels)]
    info = DatasetInfo(name=name, classes=classes, super_class=super_class, counts=counts, files=files,
                       source=source, subset=subset, skipped=skipped,
                       fingerprint=canonical.fingerprint(classes, digests),
                       parent_fingerprint=parent_fingerprint, config=config, shot_thresholds=shot_thresholds)
    info.validate()
    storage.write_text_atomic(storage.join(out, DATASET_JSON), info.to_json())  # the commit point
    return info
