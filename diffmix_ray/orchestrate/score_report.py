"""What the reports show of scores and filters: histograms of the score columns (one curve per scored
synthetic set, i.e. per method's data, with the cutoffs the filters used), the key column per target
class, a contact sheet of the lowest- and highest-scoring images, and the kept fraction per filter
(from the classifier runs' metrics.json: a report never filters again, it shows what training used)."""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from .. import canonical, storage  # noqa: E402
from ..classify.filters import parse_one  # noqa: E402
from ..console import logger  # noqa: E402
from ..contracts import (COL_CLIP_TARGET_PROB, COL_PAIR_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL,  # noqa: E402
                         SCORE_COLUMNS)
from ..errors import DiffmixError  # noqa: E402
from ..scores import ScoresSet, open_scores, score_names  # noqa: E402
from ..synthetic import SyntheticSet, open_with_dataset  # noqa: E402

MAX_CLASS_PANELS = 16  # more classes than this: one box per class instead of a histogram each
EXTREMES = 6  # images per row of the lowest/highest contact sheet


@dataclass
class Scored:
    label: str  # how the plots name it: the generation (and the methods that use it)
    synthetic: SyntheticSet
    scores: ScoresSet
    table: pa.Table
    classes: list[str]


def _save(fig, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def open_scored(synthetic: str, label: str) -> list[Scored]:
    """Every complete-enough scores run beside a generate output. Scores of other shards are left out
    with a warning: a report shows what there is and never stops at one stale folder."""
    dataset, syn = open_with_dataset(synthetic, allow_incomplete=True)
    out = []
    for name in score_names(synthetic):
        try:
            scores = open_scores(syn, name, allow_incomplete=True, use="report")
        except DiffmixError as e:
            logger.warning("report: leaving out scores %s: %s", name, e)
            continue
        if scores.files:
            out.append(Scored(f"{label} [{name}]" if name != "default" else label, syn, scores, scores.read(),
                              dataset.info.classes))
    return out


def key_column(scored: Scored, filter_records: list[dict]) -> str:
    """The column the per-class and extremes plots show: the first one a filter on these scores
    named, else the target class's CLIP probability (how much an image looks like its label)."""
    for record in filter_records:
        for s in record["scores"]:
            if storage.normalize(s["uri"]) == storage.normalize(scored.scores.uri):
                for c in record["conditions"]:
                    return parse_one(c).column
    return COL_CLIP_TARGET_PROB


def _values(table: pa.Table, column: str) -> np.ndarray:
    v = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return v[~np.isnan(v)]


def _cutoffs(records: list[tuple[str, dict]], scores_uri: str) -> dict[str, list[tuple[str, float]]]:
    """column -> (filter, value) lines to draw: thresholds and global band edges (per-class bands have
    one pair of edges per class: those show in the per-class plot's spread, not as lines)."""
    lines: dict[str, list[tuple[str, float]]] = {}
    for method, record in records:
        for s in record["scores"]:
            if storage.normalize(s["uri"]) != storage.normalize(scores_uri):
                continue
            for c in s["conditions"]:
                cond = parse_one(c["condition"])
                at = [cond.value] if cond.band is None else [] if cond.per_class else \
                    [x for x, edge in zip(c["cutoffs"].get("all", []), cond.band) if 0 < edge < 100]
                lines.setdefault(cond.column, []).extend((f"{method}: {cond.spec}", x) for x in at)
    return lines


def histograms(sets: list[Scored], out_png: str, filters: list[tuple[str, dict]]) -> str:
    """One panel per score column with values, one histogram per scored set (per method's data)."""
    columns = [c for c in SCORE_COLUMNS if any(len(_values(s.table, c)) for s in sets)]
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for s in sets:
            v = _values(s.table, column)
            if len(v):
                ax.hist(v, bins=30, alpha=0.5, label=f"{s.label} (n={len(v)})")
            for name, x in _cutoffs(filters, s.scores.uri).get(column, []):
                if not len(v) or not v.min() <= x <= v.max():
                    continue  # a cutoff outside the values keeps all or none: a line there would squash the plot
                ax.axvline(x, linestyle="--", color="k", linewidth=1)
                ax.annotate(name, (x, ax.get_ylim()[1]), fontsize=6, rotation=90, va="top", ha="right")
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    if columns:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("score histograms per scored synthetic set (dashed: a filter's cutoff)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, out_png)


def class_histograms(s: Scored, column: str, out_png: str) -> str:
    """`column` per target class: a histogram each, or one box each when there are many classes."""
    target = s.table.column(COL_TARGET_LABEL).to_numpy()
    values = s.table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    present = [c for c in np.unique(target) if (~np.isnan(values[target == c])).any()]
    if len(present) <= MAX_CLASS_PANELS:
        cols = min(4, max(1, len(present)))
        rows = max(1, math.ceil(len(present) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
        for ax, c in zip(axes.flat, present):
            v = values[target == c]
            ax.hist(v[~np.isnan(v)], bins=20, color="#468")
            ax.set_title(f"{s.classes[c]} (n={int((~np.isnan(v)).sum())})", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(8, max(4, 0.16 * len(present))))
        order = sorted(present, key=lambda c: np.nanmedian(values[target == c]))
        ax.boxplot([values[target == c][~np.isnan(values[target == c])] for c in order], vert=False, showfliers=False)
        ax.set_yticks(range(1, len(order) + 1), [s.classes[c] for c in order], fontsize=5)
        ax.set_xlabel(column)
    fig.suptitle(f"{s.label}: {column} per target class", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out_png)


def _images(syn: SyntheticSet, pair_ids: list[str]) -> dict[str, bytes]:
    """The images of `pair_ids`, reading only the row groups that hold them."""
    wanted, out = set(pair_ids), {}
    for uri in syn.files:
        ids = storage.read_parquet(uri, [COL_PAIR_ID]).column(COL_PAIR_ID).to_pylist()
        rows = {r: i for r, i in enumerate(ids) if i in wanted}
        if rows:
            out.update({rows[r]: data for r, data in canonical.read_rows(uri, list(rows)).items()})
    return out


def extremes_sheet(s: Scored, column: str, out_png: str, n: int = EXTREMES) -> str:
    """The n lowest- and n highest-scoring images of `column`, with source -> target and the score."""
    values = s.table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    known = np.flatnonzero(~np.isnan(values))
    order = known[np.argsort(values[known], kind="stable")]
    picks = [("lowest", order[:n]), ("highest", order[::-1][:n])]
    ids = s.table.column(COL_PAIR_ID).to_pylist()
    images = _images(s.synthetic, [ids[i] for _, rows in picks for i in rows])
    src, tgt = s.table.column(COL_SOURCE_LABEL).to_pylist(), s.table.column(COL_TARGET_LABEL).to_pylist()
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 6.0), squeeze=False)
    for r, (what, rows) in enumerate(picks):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(rows) and ids[rows[c]] in images:
                i = rows[c]
                ax.imshow(Image.open(io.BytesIO(images[ids[i]])).convert("RGB"))
                ax.set_title(f"{what}\n{s.classes[src[i]]} → {s.classes[tgt[i]]}\n{values[i]:.3f}", fontsize=7)
    fig.suptitle(f"{s.label}: lowest and highest {column}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out_png)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


def score_plots(sets: list[Scored], out: str, filters: list[tuple[str, dict]]) -> list[str]:
    """Every score plot for these scored sets into folder `out`; `filters`: (run or method, its
    metrics.json synthetic_filter) of the classifier runs in the report."""
    if not sets:
        return []
    written = [histograms(sets, storage.join(out, "scores.png"), filters)]
    for s in sets:
        column = key_column(s, [r for _, r in filters])
        name = _slug(posixpath.basename(s.synthetic.uri.rstrip("/")) + ("" if s.scores.name == "default"
                                                                          else f"-{s.scores.name}"))
        written.append(class_histograms(s, column, storage.join(out, f"scores-{name}-by-class.png")))
        written.append(extremes_sheet(s, column, storage.join(out, f"scores-{name}-extremes.png")))
    return written


def kept_rows(filters: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The kept fraction per filter: run (or method), filter, scores, kept / total."""
    header = ["run", "filter", "scores", "kept", "of", "kept %"]
    body = []
    for name, r in filters:
        scores = ", ".join(f"{posixpath.basename(s['synthetic'].rstrip('/'))}/{s['name']}" for s in r["scores"])
        body.append([name, ", ".join(r["conditions"]), scores, str(r["kept"]), str(r["total"]),
                     f"{100 * r['fraction']:.1f}"])
    return header, body
