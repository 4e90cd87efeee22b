"""Pair planning: which source image goes toward which class at which strength, with which seed.

Deterministic from the run seed: the same config and dataset give the same plan, and each pair's
own `seed` (derived from the run seed and the pair's index) fixes its noise, so any pair can be
regenerated alone and give the same image."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from ..contracts import (COL_MODE, COL_PAIR_ID, COL_SEED, COL_SOURCE_ID, COL_SOURCE_LABEL, COL_STRENGTH,
                         COL_TARGET_LABEL, PLAN_SCHEMA)
from ..errors import DiffmixError
from .config import DA_FUSION_STRENGTHS, GenerateConfig

BETA_CLIP = (0.1, 0.9)
# Strengths are stored as float32 (the plan contract): 0.12 becomes 0.11999999731..., and
# diffusers' int(steps * strength) would run 2 of 25 steps instead of 3. A product within this
# tolerance of an integer counts as that integer.
STEP_TOLERANCE = 1e-4


def denoising_steps(strength: float, steps: int) -> int:
    """How many of `steps` sampler steps a pair of this strength runs: floor(steps x s) of the
    decimal strength, as diffusers' img2img computes it for a float64 strength (s = 0.7 of 25 ->
    17; s = 0.12 -> 3, where float32 storage alone would give 2)."""
    return min(steps, int(steps * float(strength) + STEP_TOLERANCE))


def pair_seed(run_seed: int, index: int) -> int:
    digest = hashlib.sha256(f"diffmix-pair:{run_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF  # fits int64 and torch seeds


def pair_id(run_seed: int, index: int) -> str:
    return f"s{run_seed}-{index:08d}"


def inverse_frequency_weights(counts: list[int]) -> np.ndarray:
    """Long-tail target weights ∝ 1/(n_c + 1): compute goes to the rare classes."""
    w = 1.0 / (np.asarray(counts, dtype=np.float64) + 1.0)
    return w / w.sum()


def _targets(rng: np.random.Generator, sources: np.ndarray, counts: list[int], cfg: GenerateConfig) -> np.ndarray:
    num_classes = len(counts)
    if cfg.kind == "aug":
        return sources.copy()
    weights = (inverse_frequency_weights(counts) if cfg.target_sampling == "inverse-frequency"
               else np.full(num_classes, 1.0 / num_classes))
    if cfg.kind == "gen":
        return rng.choice(num_classes, size=len(sources), p=weights)
    if num_classes < 2:
        raise DiffmixError(f"--mode {cfg.mode} translates between classes and needs >= 2 classes")
    # Inter-class: j != i, drawn from the weights renormalised without the source class.
    out = np.empty(len(sources), dtype=np.int64)
    for c in range(num_classes):
        idx = np.flatnonzero(sources == c)
        if idx.size:
            w = weights.copy()
            w[c] = 0.0
            out[idx] = rng.choice(num_classes, size=idx.size, p=w / w.sum())
    return out


def _strengths(rng: np.random.Generator, n: int, cfg: GenerateConfig) -> np.ndarray:
    if cfg.kind == "gen":
        return np.ones(n)
    if cfg.mode == "da-fusion":
        return rng.choice(np.asarray(DA_FUSION_STRENGTHS), size=n)
    if cfg.strength_set:
        return rng.choice(np.asarray(cfg.strength_set, dtype=np.float64), size=n)
    if cfg.strength_beta:
        a, b = cfg.strength_beta
        # Rounded to 2 decimals (as the reference did) so pairs share strengths and batch together.
        return np.round(np.clip(rng.beta(a, b, size=n), *BETA_CLIP), 2)
    return np.full(n, cfg.strength)


def make_plan(image_ids: list[str], labels: list[int], num_classes: int, cfg: GenerateConfig) -> pa.Table:
    """Plan rows for the train split given as (image_ids, labels)."""
    if not image_ids:
        raise DiffmixError(f"the train split of {cfg.dataset} is empty: nothing to translate")
    order = np.argsort(np.asarray(image_ids, dtype=object), kind="stable")  # independent of input order
    ids = np.asarray(image_ids, dtype=object)[order]
    labs = np.asarray(labels, dtype=np.int64)[order]
    counts = np.bincount(labs, minlength=num_classes).tolist()
    n_train = len(ids)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xD1FF]))

    if cfg.per_image is not None:
        n = cfg.per_image * n_train
        src_idx = np.repeat(np.arange(n_train), cfg.per_image)
    else:
        n = max(1, int(round(cfg.multiplier * n_train)))
        if cfg.source_sampling == "per-image":
            src_idx = np.resize(rng.permutation(n_train), n)
        else:  # the reference: class uniform (among classes with images), then an image of it
            present = np.flatnonzero(np.asarray(counts) > 0)
            by_class = {c: np.flatnonzero(labs == c) for c in present}
            cls = rng.choice(present, size=n)
            src_idx = np.empty(n, dtype=np.int64)
            for c in present:
                where = np.flatnonzero(cls == c)
                src_idx[where] = rng.choice(by_class[c], size=where.size)
    if cfg.limit is not None:
        n = min(n, cfg.limit)
        src_idx = src_idx[:n]
    sources = labs[src_idx]
    targets = _targets(rng, sources, counts, cfg)
    strengths = _strengths(rng, n, cfg)
    text_only = cfg.kind == "gen"
    return pa.table({
        COL_PAIR_ID: pa.array([pair_id(cfg.seed, i) for i in range(n)], pa.string()),
        COL_SOURCE_ID: pa.array([None] * n if text_only else ids[src_idx].tolist(), pa.string()),
        COL_SOURCE_LABEL: pa.array(targets if text_only else sources, pa.int32()),
        COL_TARGET_LABEL: pa.array(targets, pa.int32()),
        COL_STRENGTH: pa.array(strengths, pa.float32()),
        COL_SEED: pa.array([pair_seed(cfg.seed, i) for i in range(n)], pa.int64()),
        COL_MODE: pa.array([cfg.mode] * n, pa.string()),
    }, schema=PLAN_SCHEMA)
