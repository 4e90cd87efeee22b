"""`diffmix-ray report`: results people can look at. For generate outputs, a contact sheet of
source images and their translations (class names, strengths, soft-label weights) and, when they were
scored, the score plots (score_report.py); for classifier runs, accuracy-vs-epoch plots and a
comparison table (Markdown and HTML), with the kept fraction of each run's synthetic filter."""

from __future__ import annotations

import html
import io
import os
import posixpath
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from .. import classifier_run, storage  # noqa: E402
from ..contracts import (COL_IMAGE, COL_IMAGE_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH,  # noqa: E402
                         COL_TARGET_LABEL, MANIFEST_JSON)
from ..errors import DiffmixError  # noqa: E402
from ..scores import is_scores_output  # noqa: E402
from ..synthetic import open_with_dataset  # noqa: E402
from . import score_report  # noqa: E402

def _kind(run: str) -> str:
    # a score output holds a manifest.json too: asked first, by the manifest's content
    if is_scores_output(run):
        return "score"
    if storage.exists(storage.join(run, MANIFEST_JSON)):
        return "generate"
    if classifier_run.has_metrics(run):
        return "train-cls"
    raise DiffmixError(f"{run} is neither a generate output (manifest.json), a score output (<synthetic>/scores/NAME) "
                       "nor a train-cls run (metrics.json)")


def _save_png(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(uri, buf.getvalue())


def contact_sheet(run: str, out_png: str, rows: int = 6, per_row: int = 5, gamma: float = 0.5) -> str:
    """Rows of source images, each followed by its translations toward other classes."""
    dataset, syn = open_with_dataset(run, allow_incomplete=True)
    table = syn.read([COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH, COL_IMAGE])
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, sid in enumerate(table.column(COL_SOURCE_ID).to_pylist()):
        by_source[sid].append(i)
    # The sources with the most translations first (they show one image going several ways), taking the
    # source classes in turn so the sheet shows as many classes as it has rows.
    labels = table.column(COL_SOURCE_LABEL).to_pylist()
    ranked = sorted(by_source, key=lambda s: (-len(by_source[s]), str(s)))
    per_class: dict[int, list[str]] = defaultdict(list)
    for sid in ranked:
        per_class[labels[by_source[sid][0]]].append(sid)
    turns = [per_class[c][i] for i in range(len(ranked)) for c in sorted(per_class) if i < len(per_class[c])]
    chosen = sorted(turns[:rows], key=lambda s: (labels[by_source[s][0]], str(s)))
    strengths = table.column(COL_STRENGTH).to_pylist()
    train = dataset.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE])
    source_bytes = dict(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist()))
    names = dataset.info.classes
    fig, axes = plt.subplots(len(chosen), per_row + 1, figsize=(2.2 * (per_row + 1), 2.5 * len(chosen)),
                             squeeze=False)
    for r, sid in enumerate(chosen):
        idx = sorted(by_source[sid][:per_row], key=lambda i: (strengths[i], i))  # left to right: weak to strong
        src_label = table.column(COL_SOURCE_LABEL)[idx[0]].as_py()
        cells = [(source_bytes.get(sid), f"source: {names[src_label]}")]
        for i in idx:
            tgt = table.column(COL_TARGET_LABEL)[i].as_py()
            s = table.column(COL_STRENGTH)[i].as_py()
            w = s ** gamma if tgt != src_label else 1.0
            cells.append((table.column(COL_IMAGE)[i].as_py(),
                          f"→ {names[tgt]}\ns={s:.2f}  y: {1 - w:.2f}/{w:.2f}"))
        for c in range(per_row + 1):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells) and cells[c][0] is not None:
                ax.imshow(Image.open(io.BytesIO(cells[c][0])).convert("RGB"))
                ax.set_title(cells[c][1], fontsize=8)
    mode = syn.manifest["config"]["mode"]
    fig.suptitle(f"{mode}: source → target (y = source/target weight, γ={gamma})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save_png(fig, out_png)
    return out_png


NO_SPLIT = "—"  # a split the run's dataset does not have: no score, never 0


def _scored(result: dict | None) -> bool:
    """Whether a split's result holds a score. Runs written before missing splits were recorded as
    null stored top-1 0.0 with every per-class entry null for them: no score either."""
    return bool(result) and not all(v is None for v in result.get("per_class") or [0.0])


def _series(m: dict, split: str) -> tuple[list[int], list[float]]:
    """(epochs, top-1) of one split; empty when the dataset has no such split."""
    pts = [(e["epoch"], e[split]["top1"]) for e in m["epochs"] if _scored(e.get(split))]
    return [p[0] for p in pts], [p[1] for p in pts]


def accuracy_plot(runs: list[tuple[str, dict]], out_png: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    missing = []
    for name, m in runs:
        color = None
        for split, style in (("val", "-"), ("test", "--")):
            x, y = _series(m, split)
            if not x:
                missing.append(f"{name}: no {split} split")
                continue
            # test is scored at the reported epoch only (unless --test-every-epoch): a lone point needs a marker
            marker = "o" if len(x) < len(m["epochs"]) else None
            line, = ax.plot(x, y, style, color=color, marker=marker, label=f"{name} {split}")
            color = line.get_color()
        s = m["summary"]
        # the reported epoch: on the val curve that chose it, or (--select last) on test where there is one
        at = s["val_top1"]
        if s.get("select", "val") == "last" and s["test_top1"] is not None:
            at = s["test_top1"]
        if at is not None and color is not None:
            ax.scatter([s["selected_epoch"]], [at], color=color, marker="*", s=120, zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("accuracy per epoch (★ = reported epoch: best val, or the last with --select last)"
                 + ("\n" + "; ".join(missing) if missing else ""), fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_png(fig, out_png)
    return out_png


def _pct(v: float | None) -> str:
    return NO_SPLIT if v is None else f"{100 * v:.2f}"


def comparison_rows(runs: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows, and notes (which runs lack a split, so a "—" is read as "no such split", not 0)."""
    header = ["run", "arch", "synthetic", "p", "γ", "select", "epoch", "val top-1", "test top-1"]
    lt = any(m["summary"].get("test_shot_groups") is not None or "shot_thresholds" in m["summary"] for _, m in runs)
    if lt:
        header += ["many", "medium", "few"]
    body, notes = [], []
    for name, m in runs:
        s = dict(m["summary"])
        if s.get("test_per_class") is not None and not _scored({"per_class": s["test_per_class"]}):
            s["test_top1"] = None
        syn = ", ".join(posixpath.basename(u.rstrip("/")) for u in m.get("synthetic", [])) or "none (real only)"
        # metrics.json files written before --select existed selected on val
        row = [name, m["arch"], syn, f"{m['p']:g}", f"{m['gamma']:g}", s.get("select", "val"),
               str(s["selected_epoch"]), _pct(s["val_top1"]), _pct(s["test_top1"])]
        if lt:
            groups = s.get("test_shot_groups") or {}
            row += [_pct(groups.get(g)) for g in ("many", "medium", "few")]
        body.append(row)
        missing = [sp for sp in ("val", "test") if s.get(f"{sp}_top1") is None]
        if missing:
            notes.append(f"{name}: its dataset has no {' and no '.join(missing)} split, so {NO_SPLIT} (no score)")
    if any(r[header.index("select")] == "last" for r in body):
        notes.append("select last: the final epoch is reported (no selection on val)")
    return header, body, notes


def _markdown(header, body, notes, kept=None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if kept and kept[1]:
        lines += ["", "Synthetic filters (images kept of those generated):", "",
                  "| " + " | ".join(kept[0]) + " |", "|" + "---|" * len(kept[0])]
        lines += ["| " + " | ".join(r) + " |" for r in kept[1]]
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def html_table(header, body) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _html(header, body, notes, images: list[str], kept=None) -> str:
    foot = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    if kept and kept[1]:
        foot = "<h2>Synthetic filters</h2>" + html_table(*kept) + foot
    imgs = "".join(f'<p><img src="{html.escape(os.path.basename(i))}" style="max-width:100%"></p>' for i in images)
    return ("<!doctype html><meta charset='utf-8'><title>diffmix-ray report</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>diffmix-ray report</h1>{html_table(header, body) if header else ''}{foot}{imgs}\n")


def run_report(runs: list[str], out: str | None = None, gamma: float = 0.5) -> dict[str, list[str]]:
    runs = [storage.normalize(r) for r in runs]
    if not runs:
        raise DiffmixError("give at least one generate output or train-cls run")
    out = storage.normalize(out) if out else storage.join(posixpath.dirname(runs[0].rstrip("/")), "report")
    written: dict[str, list[str]] = defaultdict(list)
    classifiers, scored = [], []
    for run in runs:
        name = posixpath.basename(run.rstrip("/"))
        kind = _kind(run)
        if kind == "generate":
            written["contact_sheets"].append(contact_sheet(run, storage.join(out, f"contact-{name}.png"), gamma=gamma))
            scored += score_report.open_scored(run, name)
        elif kind == "score":  # <synthetic>/scores/<name>: that one scores run of its generate output
            synthetic = posixpath.dirname(posixpath.dirname(run.rstrip("/")))
            label = posixpath.basename(synthetic)
            scored += [s for s in score_report.open_scored(synthetic, label) if s.scores.name == name]
        else:
            classifiers.append((name, classifier_run.read_metrics(run)))
    filters = [(name, m["synthetic_filter"]) for name, m in classifiers if m.get("synthetic_filter")]
    written["score_plots"] = score_report.score_plots(scored, out, filters)
    kept = score_report.kept_rows(filters)
    if classifiers:
        written["plots"].append(accuracy_plot(classifiers, storage.join(out, "accuracy.png")))
        header, body, notes = comparison_rows(classifiers)
        storage.write_text_atomic(storage.join(out, "comparison.md"), _markdown(header, body, notes, kept))
        written["tables"] += [storage.join(out, "comparison.md"), storage.join(out, "comparison.html")]
    images = written["contact_sheets"] + written["score_plots"] + written["plots"]
    header, body, notes = comparison_rows(classifiers) if classifiers else ([], [], [])
    storage.write_text_atomic(storage.join(out, "comparison.html" if classifiers else "index.html"),
                              _html(header, body, notes, images, kept))
    return {k: v for k, v in written.items() if v}
