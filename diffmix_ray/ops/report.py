"""`diffmix-ray report`: results people can look at. For generate outputs, a contact sheet of
source images and their translations (class names, strengths, soft-label weights); for classifier
runs, accuracy-vs-epoch plots and a comparison table (Markdown and HTML)."""

from __future__ import annotations

import html
import io
import os
import posixpath
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from .. import canonical, storage  # noqa: E402
from ..contracts import (COL_IMAGE, COL_IMAGE_ID, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH,  # noqa: E402
                         COL_TARGET_LABEL, MANIFEST_JSON)
from ..errors import DiffmixError  # noqa: E402
from ..synthetic import open_synthetic  # noqa: E402

METRICS_JSON = "metrics.json"  # the classifier run's file name (classify/run.py writes it)


def _kind(run: str) -> str:
    if storage.exists(storage.join(run, MANIFEST_JSON)):
        return "generate"
    if storage.exists(storage.join(run, METRICS_JSON)):
        return "train-cls"
    raise DiffmixError(f"{run} is neither a generate output (manifest.json) nor a train-cls run (metrics.json)")


def _save_png(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(uri, buf.getvalue())


def contact_sheet(run: str, out_png: str, rows: int = 6, per_row: int = 5, gamma: float = 0.5) -> str:
    """Rows of source images, each followed by its translations toward other classes."""
    manifest = storage.read_json(storage.join(run, MANIFEST_JSON))
    dataset = canonical.open_dataset(manifest["identity"]["dataset"])
    syn = open_synthetic(run, dataset.info.fingerprint, allow_incomplete=True)
    table = syn.read([COL_SOURCE_ID, COL_SOURCE_LABEL, COL_TARGET_LABEL, COL_STRENGTH, COL_IMAGE])
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, sid in enumerate(table.column(COL_SOURCE_ID).to_pylist()):
        by_source[sid].append(i)
    # The sources with the most translations first: they show one image going several ways.
    chosen = sorted(by_source, key=lambda s: (-len(by_source[s]), str(s)))[:rows]
    train = dataset.read_split("train", columns=[COL_IMAGE_ID, COL_IMAGE])
    source_bytes = dict(zip(train.column(COL_IMAGE_ID).to_pylist(), train.column(COL_IMAGE).to_pylist()))
    names = dataset.info.classes
    fig, axes = plt.subplots(len(chosen), per_row + 1, figsize=(2.2 * (per_row + 1), 2.5 * len(chosen)),
                             squeeze=False)
    for r, sid in enumerate(chosen):
        idx = by_source[sid][:per_row]
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
    fig.suptitle(f"{manifest['config']['mode']}: source → target (y = source/target weight, γ={gamma})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save_png(fig, out_png)
    return out_png


def accuracy_plot(runs: list[tuple[str, dict]], out_png: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in runs:
        epochs = [e["epoch"] for e in m["epochs"]]
        line, = ax.plot(epochs, [e["val"]["top1"] for e in m["epochs"]], label=f"{name} val")
        ax.plot(epochs, [e["test"]["top1"] for e in m["epochs"]], "--", color=line.get_color(), label=f"{name} test")
        sel = m["summary"]["selected_epoch"]
        ax.scatter([sel], [m["summary"]["val_top1"]], color=line.get_color(), marker="*", s=120, zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("accuracy per epoch (★ = epoch selected on val)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_png(fig, out_png)
    return out_png


def comparison_rows(runs: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "arch", "synthetic", "p", "γ", "epoch (val-selected)", "val top-1", "test top-1"]
    lt = any("test_shot_groups" in m["summary"] for _, m in runs)
    if lt:
        header += ["many", "medium", "few"]
    body = []
    for name, m in runs:
        s = m["summary"]
        syn = ", ".join(posixpath.basename(u.rstrip("/")) for u in m.get("synthetic", [])) or "none (real only)"
        row = [name, m["arch"], syn, f"{m['p']:g}", f"{m['gamma']:g}", str(s["selected_epoch"]),
               f"{100 * s['val_top1']:.2f}", f"{100 * s['test_top1']:.2f}"]
        if lt:
            groups = s.get("test_shot_groups", {})
            row += ["—" if groups.get(g) is None else f"{100 * groups[g]:.2f}" for g in ("many", "medium", "few")]
        body.append(row)
    return header, body


def _markdown(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _html(header, body, images: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    imgs = "".join(f'<p><img src="{html.escape(os.path.basename(i))}" style="max-width:100%"></p>' for i in images)
    return ("<!doctype html><meta charset='utf-8'><title>diffmix-ray report</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>diffmix-ray report</h1><table><tr>{head}</tr>{rows}</table>{imgs}\n")


def run_report(runs: list[str], out: str | None = None, gamma: float = 0.5) -> dict[str, list[str]]:
    runs = [storage.normalize(r) for r in runs]
    if not runs:
        raise DiffmixError("give at least one generate output or train-cls run")
    out = storage.normalize(out) if out else storage.join(posixpath.dirname(runs[0].rstrip("/")), "report")
    written: dict[str, list[str]] = defaultdict(list)
    classifiers = []
    for run in runs:
        name = posixpath.basename(run.rstrip("/"))
        if _kind(run) == "generate":
            written["contact_sheets"].append(contact_sheet(run, storage.join(out, f"contact-{name}.png"), gamma=gamma))
        else:
            classifiers.append((name, storage.read_json(storage.join(run, METRICS_JSON))))
    if classifiers:
        written["plots"].append(accuracy_plot(classifiers, storage.join(out, "accuracy.png")))
        header, body = comparison_rows(classifiers)
        storage.write_text_atomic(storage.join(out, "comparison.md"), _markdown(header, body))
        written["tables"] += [storage.join(out, "comparison.md"), storage.join(out, "comparison.html")]
    images = written["contact_sheets"] + written["plots"]
    header, body = comparison_rows(classifiers) if classifiers else ([], [])
    storage.write_text_atomic(storage.join(out, "comparison.html" if classifiers else "index.html"),
                              _html(header, body, images))
    return dict(written)
