"""The recipe schema: one paper setting (a table's column: a dataset, a protocol, the methods of its
rows) as a typed, validated object. recipe_files.py reads the files; this module refuses unknown
keys and values of the wrong type, checks that every reference resolves (a method's synthetic data
to a generation, a generation to a bank), and builds each stage's own config from the recipe, so a
recipe is checked by the very classes the stages validate with.

Top-level keys (docs/recipes.md has the long form):
  description, table    what the recipe reproduces (shown by `recipe list` / `recipe show`, the report's title)
  follows               which setting of the authors' code (script, commit) the recipe's values come from
  weights               the pretrained backbone it needs (name, file, how to get it): `run` refuses to start
                        without --pretrained (or --pretrained none, from scratch on purpose)
  data, data_layout     the default --data (e.g. builtin:sample), and what --data must hold
  model, clip           the default --model, and --clip (the CLIP model a method's synthetic filter scores with)
  prepare, derive       PrepareConfig options (format required) and, for a subset, DeriveConfig options
  finetune, banks       FinetuneConfig defaults; named banks, each overriding them (+ images_per_class, scale_lr)
  generate, generations GenerateConfig defaults; named generations, each overriding them (+ bank)
  score                 ScoreConfig options for the scores a method's synthetic_filter reads (one per generation
                        and scores name, written by a `score` step)
  train_cls, methods    ClassifyConfig defaults; named methods (label, synthetic, train_cls overrides)
  rows, seeds           the table's methods in order; the classifier seeds"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..classify.config import ClassifyConfig
from ..classify.filters import parse as parse_filter
from ..config import check_finite
from ..contracts import DEFAULT_SCORES_NAME
from ..data.prepare import DeriveConfig, PrepareConfig
from ..errors import DiffmixError
from ..finetune.config import FinetuneConfig
from ..generate.config import MODES, GenerateConfig
from ..score.config import ScoreConfig
from . import recipe_files

TOP_KEYS = ("description", "table", "follows", "weights", "data", "data_layout", "model", "clip", "prepare", "derive",
            "finetune", "banks", "generate", "generations", "score", "train_cls", "methods", "rows", "seeds")
WEIGHTS_KEYS = ("name", "file", "how")  # the pretrained backbone a recipe trains from, and how to get it
# Options `run` sets itself (paths between stages, the seed of each classifier run): never in a recipe.
RUN_OWNED = {PrepareConfig: ("source",), DeriveConfig: ("parent",), FinetuneConfig: ("dataset", "out", "model"),
             GenerateConfig: ("dataset", "model", "concepts", "out"),
             # a recipe's scores are CLIP's only: a classifier to score with would be another method's output
             ScoreConfig: ("synthetic", "clip", "name", "dataset", "classifier"),
             ClassifyConfig: ("dataset", "out", "synthetic", "seed")}
BANK_EXTRAS = ("images_per_class", "scale_lr")
GENERATION_EXTRAS = ("bank",)
METHOD_KEYS = ("label", "synthetic", "train_cls")
BUILTIN_SAMPLE = "builtin:sample"  # --data: the procedurally drawn sample dataset (data/sample.py)
SAMPLE_DEFAULT_SIZE = (4, 24)  # builtin:sample alone: 4 classes x 24 images; builtin:sample:12x60 says it


def builtin_sample(data: str | None) -> tuple[int, int] | None:
    """(classes, images per class) when --data is builtin:sample or builtin:sample:CxN; else None."""
    if data == BUILTIN_SAMPLE:
        return SAMPLE_DEFAULT_SIZE
    if not (data or "").startswith(BUILTIN_SAMPLE + ":"):
        return None
    from ..data.sample import SAMPLE_CLASSES

    classes, _, per_class = data[len(BUILTIN_SAMPLE) + 1:].partition("x")
    if not (classes.isdigit() and per_class.isdigit() and 1 <= int(classes) <= len(SAMPLE_CLASSES)
            and int(per_class) >= 1):
        raise DiffmixError(f"--data {data!r}: write {BUILTIN_SAMPLE}:CLASSESxIMAGES, e.g. {BUILTIN_SAMPLE}:12x60 "
                           f"(1-{len(SAMPLE_CLASSES)} classes of the sample world, images per class >= 1)")
    return int(classes), int(per_class)


def stage_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name not in RUN_OWNED[cls]]


def _allowed_types(annotation) -> tuple[type, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in _allowed_types(a))
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if typing.get_origin(annotation) is tuple:
        return (list, tuple, str)  # "20,5" or [20, 5]: the config classes parse both
    return (annotation,)


def check_options(cls, options: Any, where: str, extras: tuple[str, ...] = ()) -> dict:
    """`options` as a mapping of `cls` fields (or `extras`), each of the field's type."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise DiffmixError(f"{where} must be a mapping of option: value, not {options!r}")
    hints = typing.get_type_hints(cls)
    allowed = stage_keys(cls)
    for key, value in options.items():
        if key in extras:
            continue
        if key in RUN_OWNED[cls]:
            raise DiffmixError(f"{where}.{key} is set by `diffmix-ray run` itself (the paths between stages and "
                               "the classifier seeds): remove it from the recipe")
        if key not in allowed:
            raise DiffmixError(f"{where}: unknown option {key!r}; valid: {', '.join(sorted(allowed + list(extras)))}")
        types_ok = _allowed_types(hints[key])
        if value is None or (isinstance(value, types_ok) and not (isinstance(value, bool) and bool not in types_ok)):
            continue
        hint = ""
        if isinstance(value, str) and (int in types_ok or float in types_ok):
            hint = " (YAML reads 5e-5 as text: write 5.0e-5)"
        raise DiffmixError(f"{where}.{key}: {value!r} is a {type(value).__name__}, expected "
                           f"{' or '.join(t.__name__ for t in types_ok if t is not type(None))}{hint}")
    try:
        check_finite({k: v for k, v in options.items() if k not in extras})
    except DiffmixError as e:
        raise DiffmixError(f"{where}: {e}") from None
    return {k: v for k, v in options.items() if k not in extras}


def _build(cls, where: str, **kwargs):
    """The stage's config from recipe options (None = the stage's default), validated by the stage."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in given]
    if required:
        raise DiffmixError(f"{where}: {', '.join(required)} must be set (here or in the section's defaults)")
    try:
        cfg = cls(**given)
        cfg.validate()
    except DiffmixError as e:
        raise DiffmixError(f"{where}: {e}") from None
    return cfg


@dataclass(frozen=True)
class Bank:
    name: str
    finetune: dict  # FinetuneConfig options
    images_per_class: int | None = None  # max_steps = ceil(images_per_class x C / global batch)
    scale_lr: bool = False  # lr and ti_lr x global batch (diffusers' --scale_lr, as DA-Fusion trains)

    def config(self, dataset: str, out: str, model: str, num_classes: int) -> FinetuneConfig:
        cfg = FinetuneConfig(dataset=dataset, out=out, model=model, **_set(self.finetune))
        global_batch = cfg.batch_size * cfg.workers
        if self.images_per_class is not None:
            cfg = dataclasses.replace(cfg, max_steps=math.ceil(self.images_per_class * num_classes / global_batch))
        if self.scale_lr:
            cfg = dataclasses.replace(cfg, lr=cfg.lr * global_batch, ti_lr=cfg.ti_lr * global_batch)
        return cfg


@dataclass(frozen=True)
class Generation:
    name: str
    bank: str | None
    generate: dict  # GenerateConfig options

    def config(self, dataset: str, model: str, concepts: str | None, out: str) -> GenerateConfig:
        return GenerateConfig(dataset=dataset, model=model, concepts=concepts, out=out, **_set(self.generate))


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # the row's name in the table
    synthetic: tuple[str, ...]  # generation names
    train_cls: dict  # ClassifyConfig options

    def config(self, dataset: str, out: str, synthetic: tuple[str, ...], seed: int,
               pretrained: str | None) -> ClassifyConfig:
        opts = _set(self.train_cls) | ({"pretrained": pretrained} if pretrained else {})
        return ClassifyConfig(dataset=dataset, out=out, synthetic=synthetic, seed=seed, **opts)

    def scores(self) -> list[tuple[str, str]]:
        """(generation, scores name) this method's synthetic filter reads; [] without a filter."""
        if not self.train_cls.get("synthetic_filter"):
            return []
        names = self.train_cls.get("scores") or [DEFAULT_SCORES_NAME]
        names = [names] if isinstance(names, str) else list(names)
        return [(g, names[0] if len(names) == 1 else names[i]) for i, g in enumerate(self.synthetic)]


def _set(options: dict) -> dict:
    """Options given a value; null leaves the stage's default."""
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class Recipe:
    name: str
    file: str
    content: dict  # the merged mapping: what `recipe show` prints and what a run's identity hashes
    description: str
    table: str
    follows: str
    weights: dict | None  # {name, file, how}: the pretrained backbone `run` insists on
    data: str | None
    data_layout: str
    model: str | None
    clip: str | None
    score: dict  # ScoreConfig options
    prepare: dict
    derive: dict | None
    banks: dict[str, Bank]
    generations: dict[str, Generation]
    methods: dict[str, Method]
    rows: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def format(self) -> str:
        return self.prepare["format"]

    def select(self, methods: list[str] | None) -> list[str]:
        """The methods to run: the table's rows, or the given ones (each must be defined)."""
        if not methods:
            return list(self.rows)
        if unknown := [m for m in methods if m not in self.methods]:
            raise DiffmixError(f"recipe {self.name} has no method {', '.join(map(repr, unknown))}; its methods: "
                               f"{', '.join(self.methods)} (table rows: {', '.join(self.rows)})")
        return list(dict.fromkeys(methods))

    def generations_for(self, methods: list[str]) -> list[str]:
        return list(dict.fromkeys(g for m in methods for g in self.methods[m].synthetic))

    def scores_for(self, methods: list[str]) -> list[tuple[str, str]]:
        """(generation, scores name) pairs the methods' filters read, each once, in order."""
        return list(dict.fromkeys(p for m in methods for p in self.methods[m].scores()))

    def banks_for(self, methods: list[str]) -> list[str]:
        return list(dict.fromkeys(b for g in self.generations_for(methods) if (b := self.generations[g].bank)))

    def summary(self) -> list[str]:
        """What `recipe show` states first: the backbone's weights, the classifier protocol (batch,
        resolution, lr, epochs, reported epoch) shared by the rows, what single rows change, and which
        setting of the authors' code it follows."""
        cls = self.methods[self.rows[0]].train_cls
        lines = [f"weights: {self.weights['name']}: --pretrained {self.weights.get('file') or 'FILE'} "
                 f"(how: {' '.join(self.weights['how'].split())}); --pretrained none trains from scratch"
                 if self.weights else "weights: none needed (the architecture is trained from random initialisation)"]
        res = (f"res mode {cls.get('res_mode') or 224}" if cls.get("augment", "timm") != "timm"
               else f"{cls.get('img_size') or 'the architecture'}'s input size")
        lines.append(f"classifier: {cls.get('arch')}, {cls.get('augment', 'timm')} pipeline at {res}, batch "
                     f"{cls.get('batch_size', 32)} x {cls.get('workers', 1)} worker(s), lr {cls.get('lr', 0.05):g} "
                     f"({cls.get('optimizer', 'sgd')}, weight decay {cls.get('weight_decay', 5e-4):g}, "
                     f"{cls.get('schedule', 'cosine')} schedule), {cls.get('epochs', 30)} epochs, reported: "
                     + ("the final epoch (no val split)" if cls.get("select") == "last" else "the best val epoch"))
        keys = ("batch_size", "lr", "weight_decay", "epochs", "res_mode", "cutmix", "mixup", "mixing", "mix_prob",
                "cmo", "loss", "soft_scaler", "drop_last", "synthetic_p")
        for name in self.rows:
            own = self.methods[name].train_cls
            changed = {k: own[k] for k in keys if own.get(k) != cls.get(k)}
            if changed:
                lines.append(f"  row {name}: " + ", ".join(
                    (k if v else f"no {k}") if isinstance(v, bool) else f"{k} {v}" for k, v in changed.items()))
        if self.follows:
            lines.append("follows: " + " ".join(self.follows.split()))
        return lines


def parse(name: str, raw: dict, file: str) -> Recipe:
    """Type and validate one recipe mapping; every error names the recipe, the key and the fix."""
    where = f"recipe {name} ({file})"
    if unknown := sorted(set(raw) - set(TOP_KEYS)):
        raise DiffmixError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TOP_KEYS)}")
    prepare = check_options(PrepareConfig, raw.get("prepare"), f"{where}: prepare")
    if "format" not in prepare:
        raise DiffmixError(f"{where}: prepare.format is required (imagefolder | cub | flowers102 | parquet)")
    _build(PrepareConfig, f"{where}: prepare", source="<data>", **prepare)
    derive = None
    if raw.get("derive") is not None:
        derive = check_options(DeriveConfig, raw["derive"], f"{where}: derive")
        _build(DeriveConfig, f"{where}: derive", parent="<dataset>", **derive)
    banks = _banks(raw, where)
    generations = _generations(raw, where, banks)
    methods = _methods(raw, where, generations)
    score = check_options(ScoreConfig, raw.get("score"), f"{where}: score")
    _build(ScoreConfig, f"{where}: score", synthetic="<synthetic>", clip="<clip>", **score)
    rows = tuple(_list(raw.get("rows"), f"{where}: rows", str))
    if not rows:
        raise DiffmixError(f"{where}: rows lists the table's methods; it is empty")
    if unknown := [r for r in rows if r not in methods]:
        raise DiffmixError(f"{where}: rows name undefined method(s) {unknown}; defined: {', '.join(methods)}")
    seeds = tuple(_list(raw.get("seeds"), f"{where}: seeds", int))
    if not seeds:
        raise DiffmixError(f"{where}: seeds lists the classifier seeds (e.g. [2020, 2021, 2022]); it is empty")
    for key in ("description", "table", "follows", "data", "data_layout", "model", "clip"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise DiffmixError(f"{where}: {key} must be text, not {raw[key]!r}")
    weights = _weights(raw.get("weights"), where)
    return Recipe(name=name, file=file, content=raw, description=raw.get("description") or "",
                  table=raw.get("table") or name, follows=raw.get("follows") or "", weights=weights,
                  data=raw.get("data"),
                  data_layout=raw.get("data_layout") or f"a {prepare['format']} dataset", model=raw.get("model"),
                  clip=raw.get("clip"), score=score, prepare=prepare, derive=derive, banks=banks, generations=generations, methods=methods, rows=rows,
                  seeds=seeds)


def _weights(value, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - set(WEIGHTS_KEYS) or not all(
            isinstance(value.get(k), str) and value.get(k) for k in ("name", "how")):
        raise DiffmixError(f"{where}: weights names the pretrained backbone as a mapping with name and how (text), "
                           f"optionally file; got {value!r}")
    return dict(value)


def _list(value, where: str, kind: type) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise DiffmixError(f"{where} must be a list of {kind.__name__} values, not {value!r}")
    return value


def _mapping(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise DiffmixError(f"{where}: {key} maps each name to a mapping of its options")
    return value


def _banks(raw: dict, where: str) -> dict[str, Bank]:
    defaults = check_options(FinetuneConfig, raw.get("finetune"), f"{where}: finetune")
    out = {}
    for name, own in _mapping(raw, "banks", where).items():
        here = f"{where}: banks.{name}"
        own = own or {}
        opts = check_options(FinetuneConfig, own, here, BANK_EXTRAS)
        per_class, scale = own.get("images_per_class"), own.get("scale_lr", False)
        if per_class is not None and (not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1):
            raise DiffmixError(f"{here}.images_per_class: {per_class!r} must be a whole number >= 1")
        if per_class is not None and "max_steps" in opts:
            raise DiffmixError(f"{here}: images_per_class sets max_steps from the class count; give one of the two")
        if not isinstance(scale, bool):
            raise DiffmixError(f"{here}.scale_lr: {scale!r} must be true or false")
        bank = Bank(str(name), defaults | opts, per_class, scale)
        _build(FinetuneConfig, here, dataset="<dataset>", out="<bank>", **bank.finetune)
        out[str(name)] = bank
    return out


def _generations(raw: dict, where: str, banks: dict[str, Bank]) -> dict[str, Generation]:
    defaults = check_options(GenerateConfig, raw.get("generate"), f"{where}: generate")
    out = {}
    for name, own in _mapping(raw, "generations", where).items():
        here = f"{where}: generations.{name}"
        own = own or {}
        opts = defaults | check_options(GenerateConfig, own, here, GENERATION_EXTRAS)
        bank, mode = own.get("bank"), opts.get("mode", "diff-mix")
        if bank is not None and not isinstance(bank, str):
            raise DiffmixError(f"{here}.bank must name one bank, not {bank!r}")
        if mode not in MODES:
            raise DiffmixError(f"{here}.mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
        if MODES[mode][0] and bank is None:
            raise DiffmixError(f"{here}: mode {mode} translates with a fine-tuned concept bank: name one with "
                               f"`bank:` ({', '.join(banks) or 'define one under banks'})")
        if not MODES[mode][0] and bank is not None:
            raise DiffmixError(f"{here}: mode {mode} uses the vanilla base model; drop `bank: {bank}`")
        if bank is not None and bank not in banks:
            raise DiffmixError(f"{here}.bank {bank!r} is not defined under banks ({', '.join(banks) or 'none'})")
        if mode == "da-fusion" and banks[bank].finetune.get("mode") != "ti":
            raise DiffmixError(f"{here}: mode da-fusion uses a TI-only bank; bank {bank} trains "
                               f"{banks[bank].finetune.get('mode', 'ti+lora')}: set its mode: ti")
        generation = Generation(str(name), bank, opts)
        _build(GenerateConfig, here, dataset="<dataset>", out="<out>", concepts="<bank>" if bank else None,
               **generation.generate)
        out[str(name)] = generation
    return out


def _methods(raw: dict, where: str, generations: dict[str, Generation]) -> dict[str, Method]:
    defaults = check_options(ClassifyConfig, raw.get("train_cls"), f"{where}: train_cls")
    out = {}
    for name, own in _mapping(raw, "methods", where).items():
        here = f"{where}: methods.{name}"
        own = own or {}
        if unknown := sorted(set(own) - set(METHOD_KEYS)):
            raise DiffmixError(f"{here}: unknown key(s) {unknown}; valid: {', '.join(METHOD_KEYS)}")
        synthetic = own.get("synthetic") or []
        synthetic = [synthetic] if isinstance(synthetic, str) else _list(synthetic, f"{here}.synthetic", str)
        if missing := [g for g in synthetic if g not in generations]:
            raise DiffmixError(f"{here}.synthetic names undefined generation(s) {missing}; defined: "
                               f"{', '.join(generations) or 'none'}")
        opts = defaults | check_options(ClassifyConfig, own.get("train_cls"), f"{here}.train_cls")
        label = own.get("label") or str(name)
        method = Method(str(name), str(label), tuple(synthetic), opts)
        _build(ClassifyConfig, here, dataset="<dataset>", out="<out>", synthetic=tuple(f"<{g}>" for g in synthetic),
               seed=0, **method.train_cls)
        if bad := [c.spec for c in parse_filter(opts.get("synthetic_filter")) if c.column.startswith("classifier_")]:
            raise DiffmixError(f"{here}.train_cls.synthetic_filter {', '.join(bad)}: a recipe's `score` steps score "
                               "with CLIP only (no classifier), so classifier_* columns have no values; filter on a clip_* "
                               "column, or score with --classifier yourself and run train-cls by hand")
        out[str(name)] = method
    return out


def load(name_or_path: str) -> Recipe:
    name, raw, path = recipe_files.find(name_or_path)
    return parse(name, raw, str(path))


def catalogue() -> list[tuple[str, dict, Path]]:
    """Every recipe the searched folders define, unvalidated (a listing must not stop at one bad file)."""
    out = []
    for path in recipe_files.all_recipe_files():
        for name, raw in recipe_files.expand(path).items():
            out.append((name, raw, path))
    return out
