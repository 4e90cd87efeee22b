"""The reported result of a classifier run: which epoch (`--select val`: the best val top-1, earliest
on ties; `--select last`: the final one), its test accuracy, and many/medium/few groups. A split the
dataset does not have has no score: null in metrics.json, said in words on the console and in reports."""

from __future__ import annotations

import numpy as np

SELECTION = {"val": "best val top-1 (earliest on ties)", "last": "final epoch"}


def summarize(history: list[dict], train_counts: list[int], select: str = "val",
              thresholds: tuple[int, int] | None = None) -> dict:
    if select == "last":
        best = len(history) - 1
    else:
        best = max(range(len(history)), key=lambda i: (history[i]["val"]["top1"], -i))
    sel = history[best]
    val, test = sel.get("val"), sel.get("test")
    result = {"selected_epoch": sel["epoch"], "select": select, "selection": SELECTION[select],
              "val_top1": val["top1"] if val else None, "test_top1": test["top1"] if test else None,
              "test_per_class": test["per_class"] if test else None,
              "missing_splits": [s for s, r in (("val", val), ("test", test)) if r is None]}
    if thresholds is not None:
        result["shot_thresholds"] = {"many": thresholds[0], "few": thresholds[1]}
        result["test_shot_groups"] = shot_groups(test["per_class"], train_counts, thresholds) if test else None
    return result


def shot_groups(per_class: list, train_counts: list[int], thresholds: tuple[int, int]) -> dict:
    """Mean per-class accuracy of many (> MANY train images), medium and few (< FEW) classes; a group
    with no class (or no scored class) is None."""
    many, few = thresholds
    counts = np.asarray(train_counts)
    acc = np.array([np.nan if v is None else v for v in per_class], dtype=float)
    groups = {"many": counts > many, "few": counts < few}
    groups["medium"] = ~groups["many"] & ~groups["few"]
    return {g: (float(np.nanmean(acc[m])) if m.any() and not np.isnan(acc[m]).all() else None)
            for g, m in (("many", groups["many"]), ("medium", groups["medium"]), ("few", groups["few"]))}


def result_line(summary: dict) -> str:
    """The one-line result printed at the end of a run."""
    val, test = summary["val_top1"], summary["test_top1"]
    if summary["select"] == "last":
        head = f"final epoch {summary['selected_epoch']} (--select last)"
        if val is not None:
            head += f", val top-1 {val:.3f} (not used to select)"
    else:
        head = f"selected epoch {summary['selected_epoch']} by val top-1 {val:.3f}"
    tail = (f"test top-1 {test:.3f}" if test is not None
            else "no test score: the dataset has no test split (score one with `diffmix-ray evaluate --dataset`)")
    return f"{head}: {tail}"


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Over seeds; None when any run has no score (a split the dataset lacks)."""
    if not values or any(v is None for v in values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=0))
