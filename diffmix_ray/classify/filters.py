"""--synthetic-filter: which synthetic images a classifier may use, decided from their scores when
train-cls reads them (the shards are never rewritten, so one generation serves every threshold).

A filter is one or more conditions, all of which an image must pass (AND):

    COLUMN>=VALUE   (or >, <=, <)   a threshold on a score column, e.g. clip_target_prob>=0.2
    COLUMN:pA-B                     the band from the A-th to the B-th percentile of the column, e.g.
                                    clip_object_prob:p10-100 (all but the lowest 10%: the reference's
                                    filter_syn_data.py, the Real-Filtering baseline) or :p90-100
    COLUMN:pA-B@class               the same band, its percentiles taken within each target class

Percentiles are numpy's (linear interpolation, as the reference) over the images of one synthetic
run that have a value; a band keeps A-th <= v < B-th, and v <= B-th when B is 100, so p0-10 and
p10-100 split a run exactly as the reference's meta_0-10per / meta_10-100per do. An image without
a value in a column (no score, or a null: no source image, no classifier) passes no condition on it.

Pure functions over numpy arrays (Condition, parse, keep) plus `select`, which reads the scores
through the shared reader (diffmix_ray/scores.py) and returns the rows kept and what metrics.json
records about them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..contracts import COL_CLIP_IMAGE_SIM, COL_PAIR_ID, SCORE_COLUMNS
from ..errors import DiffmixError
from ..scores import align, open_scores

SYNTAX = ("COLUMN>=VALUE (or >, <=, <), COLUMN:pA-B (the band between the A-th and the B-th percentile, "
          "0 <= A < B <= 100) or COLUMN:pA-B@class (percentiles per target class); several conditions, "
          "comma-separated or one per --synthetic-filter, must all hold")
EXAMPLES = "e.g. clip_target_prob>=0.2 or clip_object_prob:p10-100 or clip_target_prob:p50-100@class"
OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}
_THRESHOLD = re.compile(r"^(?P<col>[^<>=:@]+)(?P<op>>=|<=|>|<)(?P<value>[^<>=:]+)$")
_BAND = re.compile(r"^(?P<col>[^<>=:@]+):p(?P<lo>[^-@]+)-(?P<hi>[^@]+)(?:@(?P<scope>.*))?$")


@dataclass(frozen=True)
class Condition:
    column: str
    op: str | None = None  # threshold: one of OPS
    value: float | None = None
    band: tuple[float, float] | None = None  # percentile band (A, B)
    per_class: bool = False  # band percentiles within each target class

    @property
    def spec(self) -> str:
        """The condition written back in its one canonical form (what metrics.json records)."""
        if self.band is None:
            return f"{self.column}{self.op}{self.value:g}"
        return f"{self.column}:p{self.band[0]:g}-{self.band[1]:g}" + ("@class" if self.per_class else "")

    def passes(self, values: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, dict]:
        """(which rows pass, the cutoffs used). `values` is float with NaN where a row has no value;
        cutoffs: {"all": [lo, hi]} for a global band, {class: [lo, hi]} per class, {} for a threshold."""
        known = ~np.isnan(values)
        if self.band is None:
            with np.errstate(invalid="ignore"):
                return known & OPS[self.op](values, self.value), {}
        ok = np.zeros(len(values), dtype=bool)
        cutoffs = {}
        groups = [(str(int(c)), target == c) for c in np.unique(target)] if self.per_class else [("all", None)]
        for key, member in groups:
            rows = known if member is None else known & member
            if not rows.any():
                continue
            lo, hi = np.percentile(values[rows], self.band)
            v = values[rows]
            ok[rows] = (v >= lo) & ((v <= hi) if self.band[1] == 100 else (v < hi))
            cutoffs[key] = [float(lo), float(hi)]
        return ok, cutoffs


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DiffmixError(f"--synthetic-filter {spec!r}: {what} {text!r} is not a number. Write {SYNTAX}; {EXAMPLES}")
    return value


def _column(name: str, spec: str) -> str:
    if name not in SCORE_COLUMNS:
        raise DiffmixError(f"--synthetic-filter {spec!r}: unknown score column {name!r}; the score columns are "
                           f"{', '.join(SCORE_COLUMNS)}")
    return name


def parse_one(spec: str) -> Condition:
    text = "".join(spec.split())  # "clip_target_prob >= 0.2" is the same condition
    if m := _BAND.match(text):
        scope = m.group("scope")
        if scope is not None and scope != "class":
            raise DiffmixError(f"--synthetic-filter {spec!r}: unknown scope @{scope}; the only one is @class "
                               "(percentiles within each target class)")
        lo, hi = _number(m.group("lo"), "percentile", spec), _number(m.group("hi"), "percentile", spec)
        if not 0 <= lo < hi <= 100:
            raise DiffmixError(f"--synthetic-filter {spec!r}: impossible percentile band p{lo:g}-{hi:g}: pA-B needs "
                               "0 <= A < B <= 100 (p10-100 keeps all but the lowest 10%, p90-100 the top 10%)")
        return Condition(_column(m.group("col"), spec), band=(lo, hi), per_class=scope == "class")
    if m := _THRESHOLD.match(text):
        if "@" in text:
            raise DiffmixError(f"--synthetic-filter {spec!r}: a threshold is the same in every class; @class takes "
                               "a percentile band's percentiles per class (COLUMN:pA-B@class)")
        return Condition(_column(m.group("col"), spec), op=m.group("op"),
                         value=_number(m.group("value"), "threshold", spec))
    raise DiffmixError(f"--synthetic-filter {spec!r} is not a condition: write {SYNTAX}; {EXAMPLES}")


def split_specs(specs) -> tuple[str, ...]:
    """'a,b' and ['a', 'b'] alike -> ('a', 'b'): one text per condition, whitespace removed."""
    if isinstance(specs, str):
        specs = [specs]
    return tuple("".join(p.split()) for s in specs or () for p in str(s).split(",") if p.strip())


def parse(specs) -> tuple[Condition, ...]:
    return tuple(parse_one(s) for s in split_specs(specs))


def keep(conditions, columns: dict[str, np.ndarray], target: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Rows passing every condition, and per condition how many pass it alone and its cutoffs."""
    kept = np.ones(len(target), dtype=bool)
    each = []
    for c in conditions:
        ok, cutoffs = c.passes(columns[c.column], target)
        kept &= ok
        each.append({"condition": c.spec, "passed": int(ok.sum()), "cutoffs": cutoffs})
    return kept, each


@dataclass
class Selection:
    rows: np.ndarray  # indices of the kept synthetic rows, in the order train-cls reads them
    record: dict  # metrics.json "synthetic_filter"


def _values(table, rows: np.ndarray, column: str) -> np.ndarray:
    """The column at `rows` of the scores table (-1: no score) as float64 with NaN for no value."""
    col = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls come out as NaN
    out = np.full(len(rows), np.nan)
    out[rows >= 0] = col[rows[rows >= 0]]
    return out


def _check_has_values(conditions, columns: dict[str, np.ndarray], where: str) -> None:
    for c in conditions:
        if len(columns[c.column]) and np.isnan(columns[c.column]).all():
            why = ("they were computed without --classifier: score again with --classifier RUN under another --name "
                   "and pass --scores NAME" if c.column.startswith("classifier_") else
                   "text-to-image pairs have no source image" if c.column == COL_CLIP_IMAGE_SIM else
                   "no pair of the shards has a score yet")
            raise DiffmixError(f"--synthetic-filter {c.spec!r}: the scores {where} hold no value in {c.column} ({why})")


def select(conditions, syn_sets, names: list[str], source: np.ndarray, target: np.ndarray,
           allow_incomplete: bool) -> Selection:
    """Filter the synthetic rows (every set's rows, in order: `source`/`target` are their labels) on
    each set's own scores `names[i]`; percentiles are taken per set. Refuses what open_scores
    refuses, scores missing pairs of the shards (unless allow_incomplete), a condition on a column
    without values, and a filter that keeps nothing."""
    kept_rows, per_set, passed, start = [], [], {c.spec: 0 for c in conditions}, 0
    for syn, name in zip(syn_sets, names):
        scores = open_scores(syn, name, allow_incomplete)
        pair_ids = syn.read([COL_PAIR_ID]).column(COL_PAIR_ID)
        n = len(pair_ids)
        table = scores.read()
        at = align(table, pair_ids)
        unscored = int((at < 0).sum())
        if unscored and not allow_incomplete:
            raise DiffmixError(f"scores {scores.uri} have no score for {unscored} of the {n} pairs in {syn.uri} "
                               "(scored while generate was still going?): rerun the same `diffmix-ray score` command to score "
                               "them, or pass --allow-incomplete (pairs without a score are never kept)")
        columns = {c.column: _values(table, at, c.column) for c in conditions}
        _check_has_values(conditions, columns, scores.uri)
        ok, each = keep(conditions, columns, target[start:start + n])
        for e in each:
            passed[e["condition"]] += e["passed"]
        kept_rows.append(start + np.flatnonzero(ok))
        per_set.append(scores.summary() | {"synthetic": syn.uri, "pairs": n, "without_score": unscored,
                                           "kept": int(ok.sum()), "conditions": each})
        start += n
    rows = np.concatenate(kept_rows) if kept_rows else np.zeros(0, dtype=np.int64)
    spec = ", ".join(c.spec for c in conditions)
    if not len(rows):
        raise DiffmixError(f"--synthetic-filter {spec} keeps none of the {start} synthetic images: loosen it (a lower "
                           "threshold, a wider band)")
    return Selection(rows, {"conditions": [c.spec for c in conditions], "kept": int(len(rows)), "total": int(start),
                            "fraction": len(rows) / start if start else 0.0, "passed": passed, "scores": per_set,
                            "pairs": pair_counts(source, target, rows)})


def pair_counts(source: np.ndarray, target: np.ndarray, rows: np.ndarray) -> list[dict]:
    """Per (source, target) class pair: images kept and images there were."""
    kept = np.zeros(len(source), dtype=bool)
    kept[rows] = True
    pairs = np.stack([source, target], axis=1) if len(source) else np.zeros((0, 2), dtype=np.int64)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    totals, kepts = np.bincount(inverse, minlength=len(uniq)), np.bincount(inverse, weights=kept, minlength=len(uniq))
    return [{"source": int(s), "target": int(t), "kept": int(k), "total": int(n)}
            for (s, t), k, n in zip(uniq, kepts, totals)]


def describe(record: dict) -> str:
    """One line for the start of a run."""
    names = sorted({s["name"] for s in record["scores"]})
    return (f"synthetic filter {', '.join(record['conditions'])} (scores {', '.join(names)}): kept {record['kept']} of "
            f"{record['total']} synthetic images ({100 * record['fraction']:.1f}%)")


def scores_identity(record: dict) -> list[str]:
    """What of the scores decides the run: their fingerprints (other scores under the same name, other rows)."""
    return [f"{s['fingerprint']}:{storage.normalize(s['uri'])}" for s in record["scores"]]
