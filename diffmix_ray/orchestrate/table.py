"""The report of `diffmix-ray run`: the recipe's table in the paper's shape (one row per method, the
reported top-1 as mean ± std over seeds, and many/medium/few for long-tailed data) as Markdown and
HTML, with the plots: top-1 per method (bars, one dot per seed), accuracy per epoch (mean over seeds),
a contact sheet per generation (and, for one made from the sample world, what its judge sees in it), and
for scored generations the score plots and the kept fraction of each method's synthetic filter
(score_report.py). Every finished classifier run under <out>/classifiers counts, so the table grows as
methods and seeds are added."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .. import canonical, classifier_run, storage  # noqa: E402
from ..classify.summary import mean_std  # noqa: E402
from ..console import console  # noqa: E402
from ..contracts import DATASET_JSON, SUCCESS  # noqa: E402
from . import score_report  # noqa: E402
from .judged import judge_synthetic, judged_markdown, of_the_sample_world  # noqa: E402
from .recipes import Recipe  # noqa: E402
from .report import NO_SPLIT, _save_png, _series, contact_sheet, html_table  # noqa: E402

BASELINE = "real-only"
GROUPS = ("many", "medium", "few")


@dataclass
class Row:
    method: str
    label: str
    seeds: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def top1(self) -> tuple[float | None, float | None]:
        return mean_std([m["summary"]["test_top1"] for m in self.metrics])

    def group(self, name: str) -> float | None:
        values = [(m["summary"].get("test_shot_groups") or {}).get(name) for m in self.metrics]
        return mean_std(values)[0]


def collect(recipe: Recipe, layout) -> list[Row]:
    """Finished classifier runs per method, in the table's row order (then other methods run)."""
    order = list(recipe.rows) + [m for m in recipe.methods if m not in recipe.rows]
    rows = []
    for method in order:
        row = Row(method, recipe.methods[method].label)
        folder = layout.path("classifiers", method)
        names = [n for n in storage.list_dir(folder) if n.startswith("seed-")]
        for name in sorted(names, key=lambda n: int(n.split("-", 1)[1])):
            run = storage.join(folder, name)
            if classifier_run.is_finished(run):
                row.seeds.append(int(name.split("-", 1)[1]))
                row.metrics.append(classifier_run.read_metrics(run))
        if row.metrics:
            rows.append(row)
    return rows


def _pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return NO_SPLIT
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


PROTOCOL = {"last": "last epoch", "val": "val-selected epoch"}


def protocol(rows: list[Row]) -> str:
    """Which epoch the table reports: the final one (no val split: the recipes' protocol) or the one
    val selected; said in the column header, so a number is never read under the other protocol."""
    kinds = {k for r in rows for m in r.metrics if (k := m["summary"].get("select", m.get("select")))}
    return " / ".join(PROTOCOL.get(k, str(k)) for k in sorted(kinds))


def table_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    grouped = any(m["summary"].get("test_shot_groups") for r in rows for m in r.metrics)
    said = protocol(rows)
    header = ["Method", f"Top-1 (%, {said})" if said else "Top-1 (%)", "Δ vs Real only", "Seeds"] + \
        ([g.capitalize() for g in GROUPS] if grouped else [])
    base = next((r.top1()[0] for r in rows if r.method == BASELINE), None)
    body = []
    for r in rows:
        mean, std = r.top1()
        delta = NO_SPLIT if mean is None or base is None or r.method == BASELINE else f"{100 * (mean - base):+.2f}"
        line = [r.label, _pct(mean, std), delta, ",".join(map(str, r.seeds))]
        if grouped:
            line += [_pct(r.group(g)) for g in GROUPS]
        body.append(line)
    return header, body


def _context(recipe: Recipe, layout, rows: list[Row], seeds: list[int]) -> list[str]:
    lines = []
    if storage.exists(storage.join(layout.path("dataset"), DATASET_JSON)):
        info = canonical.open_dataset(layout.path("dataset")).info
        subset = info.subset.get("kind")
        lines.append(f"Dataset {info.name}: {info.num_classes} classes, {info.split_size('train')} train / "
                     f"{info.split_size('test')} test images" + (f" ({subset})" if subset else ""))
    if rows:
        s = rows[0].metrics[0]
        lines.append(f"Classifier {s['arch']}, {s['config'].get('augment')} pipeline, {s['config']['epochs']} epochs; "
                     f"reported epoch: {s['summary'].get('selection', s['select'])}")
        lines += _weights_lines(rows)
    lines.append("Top-1: test accuracy at the reported epoch, mean ± std (population) over the seeds listed; "
                 "Δ: difference of means to Real only")
    for r in rows:
        if missing := [s for s in seeds if s not in r.seeds]:
            lines.append(f"{r.label}: seed(s) {', '.join(map(str, missing))} not finished yet")
    if any(m["summary"]["test_top1"] is None for r in rows for m in r.metrics):
        lines.append(f"{NO_SPLIT}: the dataset has no test split (no score, not 0)")
    return lines


def _weights_lines(rows: list[Row]) -> list[str]:
    """The backbone weights every run started from (file and sha256, or a random initialisation)."""
    seen = {}
    for r in rows:
        for m in r.metrics:
            w = m.get("weights") or {"init": "not recorded (a run from before weights were recorded)"}
            key = w.get("sha256") or w.get("init")
            seen.setdefault(key, (w, []))[1].append(r.label)
    lines = []
    for w, labels in seen.values():
        what = (f"{w['file']} (sha256 {w['sha256'][:16]})" if w.get("sha256") else w.get("init", "?"))
        lines.append(f"Backbone weights: {what}" + ("" if len(seen) == 1 else f" ({', '.join(dict.fromkeys(labels))})"))
    return lines


def _markdown(title: str, header, body, context: list[str], timings: list[dict], kept=None,
              judged: list[str] = ()) -> str:
    out = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    out += [""] + [f"- {c}" for c in context]
    if kept and kept[1]:
        out += ["", "Synthetic filters (images kept of those generated):", "",
                "| " + " | ".join(kept[0]) + " |", "|" + "---|" * len(kept[0])]
        out += ["| " + " | ".join(r) + " |" for r in kept[1]]
    for j in judged:
        out += ["", j.rstrip("\n")]
    if timings:
        out += ["", "Stage wall times (each from the invocation that completed it):", "",
                "| step | seconds | completed by the run started |", "|---|---|---|"]
        out += [f"| {t['step']} | {t['seconds']:.1f} | {t['started']} |" for t in timings]
    return "\n".join(out) + "\n"


def _html(title: str, header, body, context: list[str], images: list[str], kept=None) -> str:
    notes = "".join(f"<li>{html.escape(c)}</li>" for c in context)
    if kept and kept[1]:
        notes += "</ul><h2>Synthetic filters</h2>" + html_table(*kept) + "<ul>"
    imgs = "".join(f'<p><img src="{html.escape(os.path.basename(i))}" style="max-width:100%"></p>' for i in images)
    return ("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>{html.escape(title)}</h1>{html_table(header, body)}<ul>{notes}</ul>{imgs}\n")


def methods_plot(rows: list[Row], out_png: str) -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4))
    for i, r in enumerate(rows):
        scores = [m["summary"]["test_top1"] for m in r.metrics if m["summary"]["test_top1"] is not None]
        if scores:
            ax.bar(i, 100 * np.mean(scores), color="#9ab", yerr=100 * np.std(scores), capsize=4)
            ax.scatter([i] * len(scores), [100 * s for s in scores], color="#234", s=12, zorder=3)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("top-1 per method: mean ± std over seeds (dots: seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, out_png)
    return out_png


def curves_plot(rows: list[Row], out_png: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        split = "test" if all(_series(m, "test")[0] for m in r.metrics) else "val"
        series = [_series(m, split) for m in r.metrics]
        if not all(x for x, _ in series):
            continue
        epochs = series[0][0]
        if all(x == epochs for x, _ in series):
            ax.plot(epochs, [100 * v for v in np.mean([y for _, y in series], axis=0)], label=f"{r.label} ({split})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy per epoch, mean over seeds", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_png(fig, out_png)
    return out_png


def write_report(recipe: Recipe, layout, seeds: list[int], timings: list[dict] | None = None) -> dict:
    out = layout.path("report")
    rows = collect(recipe, layout)
    header, body = table_rows(rows)
    context = _context(recipe, layout, rows, seeds)
    images = []
    if rows:
        images += [methods_plot(rows, storage.join(out, "methods.png")), curves_plot(rows, storage.join(out, "accuracy.png"))]
    scored, judged = [], []
    for name in recipe.generations:
        run = layout.synthetic(name)
        if storage.exists(storage.join(run, SUCCESS)):
            users = [m for m in recipe.methods if name in recipe.methods[m].synthetic]
            gamma = recipe.methods[users[0] if users else recipe.rows[0]].train_cls.get("gamma", 0.5)
            images.append(contact_sheet(run, storage.join(out, f"contact-{name}.png"), gamma=gamma))
            ran = [r.label for r in rows if r.method in users]
            scored += score_report.open_scored(run, f"{name} ({', '.join(ran)})" if ran else name)
            if of_the_sample_world(run):  # the sample world's judge says what the translations became
                judged.append(judged_markdown(judge_synthetic(run, gamma), f"What the judge sees in {name} (colour "
                                              "and shape measured, no model)"))
    filters = [(r.label, r.metrics[0]["synthetic_filter"]) for r in rows if r.metrics[0].get("synthetic_filter")]
    images += score_report.score_plots(scored, out, filters)
    kept = score_report.kept_rows(filters)
    kept = (["method"] + kept[0][1:], kept[1])  # one row per method: every seed reads the same scores and filter
    markdown = _markdown(recipe.table, header, body, context, timings or [], kept, judged)
    storage.write_text_atomic(storage.join(out, "table.md"), markdown)
    if judged:
        storage.write_text_atomic(storage.join(out, "judged.md"), "\n".join(judged))
    storage.write_text_atomic(storage.join(out, "table.html"), _html(recipe.table, header, body, context, images, kept))
    return {"markdown": markdown, "table": [header] + body, "files": [storage.join(out, "table.md"),
                                                                       storage.join(out, "table.html")] + images}


def print_summary(report: dict, steps: list[dict], seconds: float) -> None:
    """The table and the wall time of each step, at the end of a run."""
    if report.get("markdown"):
        console.print(report["markdown"].split("\nStage wall times")[0], highlight=False, markup=False)
    ran = [s for s in steps if s["status"] == "ran"]
    console.print(f"steps run: {len(ran)}, skipped as complete: {len(steps) - len(ran)}; total {seconds:.1f} s",
                  highlight=False)
    for s in ran:
        console.print(f"  {s['step']:<40} {s['seconds']:8.1f} s", highlight=False, markup=False)
    for f in report.get("files", []):
        console.print(f"report: {f}", highlight=False)
