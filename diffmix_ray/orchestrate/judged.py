"""What the sample world's judge (sample_world.judge: colour and shape by measurement, no model) sees in
a generate output made from the sample dataset: per strength, the share of translated images it judges
to be of their target class, of their source class, or of neither, beside the soft label's target
weight s^gamma. This is how the demo and `run sample` say whether the method did what it claims."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
from PIL import Image

from .. import canonical, sample_world, storage
from ..contracts import COL_IMAGE, COL_SOURCE_LABEL, COL_STRENGTH, COL_TARGET_LABEL, MANIFEST_JSON
from ..errors import DiffmixError
from ..synthetic import open_synthetic


def _source_dataset(run: str) -> canonical.Dataset:
    """The dataset a generate output was made from, as its manifest records it."""
    return canonical.open_dataset(storage.read_json(storage.join(run, MANIFEST_JSON))["identity"]["dataset"])


def _foreign_classes(names) -> list[str]:
    return [n for n in names if n not in sample_world.CLASS_NAMES]


def of_the_sample_world(run: str) -> bool:
    """Whether `run` was generated from a dataset of the sample world's classes (what the judge can read)."""
    return not _foreign_classes(_source_dataset(run).info.classes)


def judge_synthetic(run: str, gamma: float = 0.5) -> list[dict]:
    """One row per strength (ascending): pairs, judged target / source / other share, label target weight."""
    dataset = _source_dataset(run)
    names = dataset.info.classes
    if unknown := _foreign_classes(names):
        raise DiffmixError(f"{run} was generated from {dataset.uri}, whose classes ({', '.join(unknown[:3])}, ...) are "
                           "not the sample world's: the judge reads only the sample world's colours and shapes")
    world_label = [sample_world.CLASS_NAMES.index(n) for n in names]  # dataset label -> the world's label
    syn = open_synthetic(run, dataset.info.fingerprint, allow_incomplete=True)
    table = syn.read([COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH, COL_IMAGE])
    groups: dict[float, list[tuple[int, int, int]]] = defaultdict(list)
    for src, tgt, s, image in zip(*(table.column(c).to_pylist() for c in
                                    (COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH, COL_IMAGE))):
        judged = sample_world.judge(Image.open(io.BytesIO(image))).label
        groups[round(float(s), 4)].append((world_label[src], world_label[tgt], judged))
    rows = []
    for s in sorted(groups):
        g = np.array(groups[s])
        inter = g[:, 0] != g[:, 1]
        rows.append({"strength": s, "pairs": len(g), "target": float(np.mean(g[:, 2] == g[:, 1])),
                     "source": float(np.mean(g[inter, 2] == g[inter, 0])) if inter.any() else None,
                     "other": float(np.mean((g[:, 2] != g[:, 1]) & (g[:, 2] != g[:, 0]))),
                     "label_target_weight": s ** gamma if inter.any() else 1.0})
    return rows


def judged_markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| strength | pairs | judged target | judged source | neither | label's target weight s^γ |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        source = "—" if r["source"] is None else f"{100 * r['source']:.0f}%"
        lines.append(f"| {r['strength']:.2f} | {r['pairs']} | {100 * r['target']:.0f}% | {source} | "
                     f"{100 * r['other']:.0f}% | {r['label_target_weight']:.2f} |")
    return "\n".join(lines) + "\n"
