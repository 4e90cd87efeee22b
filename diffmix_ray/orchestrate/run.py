"""`diffmix-ray run RECIPE`: a whole table column of the paper as one resumable command.

    prepare (+ derive) -> finetune, one per bank the methods need -> generate, one per generation
    -> score, one per generation and scores name a method's synthetic filter reads
    -> train-cls for every method x seed -> report (table.py)

Each step calls the stage's public entry point and is skipped when the stage's own completion marker
is there (dataset.json, concepts.json, _SUCCESS); an unfinished step is simply run again, and the
stage resumes from what it left (finetune from its last checkpoint, generate the missing pairs,
train-cls its last epoch). So a crash anywhere, or a killed driver, resumes on rerun. <out>/_run.json
pins the recipe's content and the inputs: another recipe, --data or --model at the same --out is
refused (--overwrite starts again); --methods and --seeds only choose what to run.

Layout of <out>: raw/ (built-in data only), dataset-full/ (when the recipe derives a subset), dataset/,
banks/<bank>/, synthetic/<generation>/ (and its scores/<name>/), classifiers/<method>/seed-<s>/, report/,
timings.json."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .. import canonical, lease, storage
from ..console import console
from ..contracts import CONCEPTS_JSON, DATASET_JSON, DEFAULT_SCORES_NAME, SCORES_DIR, SUCCESS
from ..errors import DiffmixError
from . import table
from .recipes import BUILTIN_SAMPLE, Recipe, builtin_sample

TIMINGS_JSON = "timings.json"
# --clip is not pinned either (nor the recipe's clip): it is needed only once a filtering method is
# chosen, which --methods may do on a later rerun; scores of another CLIP under the same name are
# refused by `score` itself.
IDENTITY_EXCLUDED = ("description", "table", "follows", "weights", "data_layout", "data", "model", "clip", "rows",
                     "seeds")


@dataclass(frozen=True)
class Layout:
    out: str

    def path(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    @property
    def raw(self) -> str:
        return self.path("raw")

    def bank(self, name: str) -> str:
        return self.path("banks", name)

    def synthetic(self, name: str) -> str:
        return self.path("synthetic", name)

    def scores(self, generation: str, name: str) -> str:
        return self.path("synthetic", generation, SCORES_DIR, name)

    def classifier(self, method: str, seed: int) -> str:
        return self.path("classifiers", method, f"seed-{seed}")


@dataclass(frozen=True)
class Step:
    name: str
    marker: str | None  # the stage's completion marker; None: always run (the report)
    work: Callable[[], object]
    ray: bool = False  # needs Ray (started once, before the first such step that runs)


@dataclass
class Timings:
    """This invocation's steps and their wall times, kept in <out>/timings.json after every step (so a
    crash keeps the record) beside those of earlier invocations."""

    uri: str
    args: dict
    steps: list[dict] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def add(self, step: str, status: str, seconds: float) -> None:
        self.steps.append({"step": step, "status": status, "seconds": round(seconds, 2)})
        mine = {"started": self.started, "args": self.args, "steps": self.steps}
        runs = [r for r in self._history() if r.get("started") != self.started] + [mine]
        storage.write_json_atomic(self.uri, {"invocations": runs})

    def _history(self) -> list[dict]:
        return storage.read_json(self.uri)["invocations"] if storage.exists(self.uri) else []

    def completed(self) -> list[dict]:
        """Per step, the wall time of the invocation that completed it (a step cut short by a crash
        is timed by the rerun that finished it), in the order steps first ran."""
        last: dict[str, dict] = {}
        for run in self._history():
            for s in run["steps"]:
                if s["status"] == "ran":
                    last[s["step"]] = {"step": s["step"], "seconds": s["seconds"], "started": run["started"]}
        return list(last.values())


def check_data(recipe: Recipe, data: str) -> None:
    """--data must look like the recipe's format; said before any work, with what it looks like."""
    from ..data.readers import detect_format

    if builtin_sample(data):
        if recipe.format != "imagefolder":
            raise DiffmixError(f"--data {BUILTIN_SAMPLE} is an imagefolder dataset; recipe {recipe.name} reads "
                               f"--data as {recipe.format}: {recipe.data_layout}")
        return
    found, evidence = detect_format(data)
    if found != recipe.format:
        looks = f"looks like {found} ({evidence})" if found else f"is no dataset this recipe can read: {evidence}"
        raise DiffmixError(f"recipe {recipe.name} reads --data as {recipe.format} ({recipe.data_layout}), but "
                           f"{data} {looks}. Pass such a folder, or pick a recipe for this format "
                           "(`diffmix-ray recipe list`)")


def check_weights(recipe: Recipe, methods: list[str], pretrained: str | None) -> None:
    """A recipe that trains from pretrained weights refuses to start without them (a random backbone
    would be compared with published numbers without a word); --pretrained none is that choice made on
    purpose. Given weights are checked against every architecture the methods train, before any work."""
    from ..classify.model import FROM_SCRATCH, build_model

    if pretrained is None and recipe.weights:
        w = recipe.weights
        raise DiffmixError(f"recipe {recipe.name} trains its classifier from {w['name']}: pass --pretrained "
                           f"{w.get('file') or 'FILE'} (how to get it: {' '.join(w['how'].split())}), or "
                           "--pretrained none to train from random weights on purpose")
    if pretrained and pretrained != FROM_SCRATCH:
        for arch in dict.fromkeys(recipe.methods[m].train_cls["arch"] for m in methods):
            build_model(arch, 2, pretrained)  # names the file and what does not fit; the head is replaced anyway


class Runner:
    def __init__(self, recipe: Recipe, data: str, model: str | None, out: str, methods: list[str],
                 seeds: list[int], pretrained: str | None, clip: str | None = None):
        self.recipe, self.data, self.model, self.pretrained, self.clip = recipe, data, model, pretrained, clip
        self.methods, self.seeds = methods, seeds
        self.layout = Layout(out)
        self.full = self.layout.path("dataset-full") if recipe.derive is not None else self.layout.path("dataset")
        self.dataset = self.layout.path("dataset")
        self._ray_started = False
        self.timings: Timings | None = None

    def identity(self) -> dict:
        """What decides the outputs under <out>: the recipe's settings and the inputs. Its words (description,
        table title, data layout) and its row and seed lists (what to run, not how) are left out, so editing
        them, or choosing other --methods/--seeds, keeps the run."""
        settings = {k: v for k, v in self.recipe.content.items() if k not in IDENTITY_EXCLUDED}
        return {"recipe": self.recipe.name, "settings": settings, "data": self.data, "model": self.model,
                "pretrained": self.pretrained}

    # -- the steps ---------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        r, lay = self.recipe, self.layout
        steps = [Step("prepare", storage.join(self.full, DATASET_JSON), self._prepare)]
        if r.derive is not None:
            steps.append(Step("derive", storage.join(self.dataset, DATASET_JSON), self._derive))
        for b in r.banks_for(self.methods):
            steps.append(Step(f"finetune {b}", storage.join(lay.bank(b), CONCEPTS_JSON),
                              lambda b=b: self._finetune(b), ray=True))
        for g in r.generations_for(self.methods):
            steps.append(Step(f"generate {g}", storage.join(lay.synthetic(g), SUCCESS),
                              lambda g=g: self._generate(g), ray=True))
        for g, name in r.scores_for(self.methods):
            steps.append(Step(f"score {g}" + (f" ({name})" if name != DEFAULT_SCORES_NAME else ""),
                              storage.join(lay.scores(g, name), SUCCESS), lambda g=g, n=name: self._score(g, n),
                              ray=True))
        for m in self.methods:
            for s in self.seeds:
                steps.append(Step(f"train-cls {m} seed {s}", storage.join(lay.classifier(m, s), SUCCESS),
                                  lambda m=m, s=s: self._train_cls(m, s), ray=True))
        steps.append(Step("report", None, self._report))
        return steps

    def _prepare(self) -> None:
        from ..data.prepare import PrepareConfig, prepare

        source = self._sample() if builtin_sample(self.data) else self.data
        prepare(PrepareConfig(source=source, **self.recipe.prepare), self.full, show_progress=console.is_terminal)

    def _sample(self) -> str:
        """The built-in sample dataset at <out>/raw (deterministic: a rerun writes the same files)."""
        import os
        import tempfile

        from ..data.sample import write_sample_imagefolder

        classes, per_class = builtin_sample(self.data)
        if not storage.is_s3(self.layout.out):
            return write_sample_imagefolder(self.layout.raw, num_classes=classes, per_class=per_class)
        with tempfile.TemporaryDirectory() as local:  # drawn here, then uploaded beside the other outputs
            write_sample_imagefolder(local, num_classes=classes, per_class=per_class)
            for folder, _, files in os.walk(local):
                for name in files:
                    rel = os.path.relpath(os.path.join(folder, name), local)
                    with open(os.path.join(folder, name), "rb") as f:
                        storage.write_bytes_atomic(storage.join(self.layout.raw, *rel.split(os.sep)), f.read())
        return self.layout.raw

    def _derive(self) -> None:
        from ..data.prepare import DeriveConfig, derive

        derive(DeriveConfig(parent=self.full, **self.recipe.derive), self.dataset)

    def _num_classes(self) -> int:
        return canonical.open_dataset(self.dataset).info.num_classes

    def _finetune(self, bank: str) -> None:
        from ..finetune.run import run_finetune

        cfg = self.recipe.banks[bank].config(self.dataset, self.layout.bank(bank), self.model, self._num_classes())
        console.print(f"bank {bank}: {cfg.mode}, {cfg.max_steps} steps, lr {cfg.lr:g}, token lr {cfg.ti_lr:g}",
                      highlight=False)
        run_finetune(cfg)

    def _generate(self, name: str) -> None:
        from ..generate.run import run_generate

        gen = self.recipe.generations[name]
        run_generate(gen.config(self.dataset, self.model, self.layout.bank(gen.bank) if gen.bank else None,
                                self.layout.synthetic(name)))

    def _score(self, generation: str, name: str) -> None:
        from ..score.config import ScoreConfig
        from ..score.run import run_score

        run_score(ScoreConfig(synthetic=self.layout.synthetic(generation), clip=self.clip, name=name,
                              dataset=self.dataset, **self.recipe.score))

    def _train_cls(self, method: str, seed: int) -> None:
        from ..classify.run import run_classify

        m = self.recipe.methods[method]
        out = self.layout.classifier(method, seed)
        cfg = m.config(self.dataset, out, tuple(self.layout.synthetic(g) for g in m.synthetic), seed, self.pretrained)
        run_classify(cfg)  # an unfinished run of this config continues from its last epoch

    def _report(self) -> dict:
        return table.write_report(self.recipe, self.layout, self.seeds, self.timings.completed() if self.timings else [])

    # -- running them ----------------------------------------------------------------------------
    def _start_ray(self) -> None:
        if self._ray_started:
            return
        from ..runtime.local_ray import init_ray

        r = self.recipe
        # A private Ray is sized once, for the largest stage it will run (stages join it as it is).
        need = [r.methods[m].train_cls.get("workers", 1) * r.methods[m].train_cls.get("cpus_per_worker", 1.0)
                for m in self.methods]
        need += [r.banks[b].finetune.get("workers", 1) * r.banks[b].finetune.get("cpus_per_worker", 1.0)
                 for b in r.banks_for(self.methods)]
        need += [r.generations[g].generate.get("max_actors", 1) * r.generations[g].generate.get("cpus_per_actor", 1.0)
                 for g in r.generations_for(self.methods)]
        if r.scores_for(self.methods):
            need.append(r.score.get("max_actors", 1) * r.score.get("cpus_per_actor", 1.0))
        init_ray(min_cpus=max(need, default=1.0))  # joins RAY_ADDRESS (a Ray job) or starts a private one
        self._ray_started = True

    def run(self, timings: Timings) -> dict:
        self.timings = timings
        steps = self.steps()
        pending = [s for s in steps if s.marker is None or not storage.exists(s.marker)]
        console.print(f"run {self.recipe.name}: {len(steps)} steps, {len(steps) - len(pending)} already complete; "
                      f"methods {', '.join(self.methods)}; seeds {', '.join(map(str, self.seeds))} -> "
                      f"{self.layout.out}", highlight=False)
        result = {}
        for i, step in enumerate(steps, 1):
            if step.marker is not None and storage.exists(step.marker):
                console.print(f"{i}/{len(steps)} {step.name}: complete, skipped", style="dim")
                timings.add(step.name, "skipped", 0.0)
                continue
            console.rule(f"{i}/{len(steps)} {step.name}")
            if step.ray:
                self._start_ray()
            t0 = time.perf_counter()
            result = step.work()
            timings.add(step.name, "ran", time.perf_counter() - t0)
        return result or {}


@lease.scoped  # the output has one writer while this runs, and none after
def run_recipe(recipe: Recipe, out: str, data: str | None = None, model: str | None = None,
               seeds: list[int] | None = None, methods: list[str] | None = None, pretrained: str | None = None,
               overwrite: bool = False, clip: str | None = None) -> dict:
    """Run (or resume) the recipe's steps into `out`; returns what the report wrote (paths, table)."""
    started = time.perf_counter()
    data = data or recipe.data
    if not data:
        raise DiffmixError(f"recipe {recipe.name} needs --data: {recipe.data_layout}")
    data = data if builtin_sample(data) else storage.normalize(data)
    chosen = recipe.select(methods)
    model = model or recipe.model
    if recipe.generations_for(chosen) and not model:
        raise DiffmixError(f"recipe {recipe.name} needs --model for {', '.join(m for m in chosen if recipe.methods[m].synthetic)}: "
                           "the base diffusion model (a diffusers folder or s3:// URI of SD 1.5; `tiny` for a smoke run)")
    clip = clip or recipe.clip
    if (scored := recipe.scores_for(chosen)) and not clip:
        users = [m for m in chosen if recipe.methods[m].scores()]
        raise DiffmixError(f"recipe {recipe.name} needs --clip for {', '.join(users)}: the CLIP model their synthetic "
                           f"filter scores {', '.join(sorted({g for g, _ in scored}))} with (a CLIPModel folder or "
                           "s3:// URI of CLIP ViT-B/32, the reference's; `tiny` for a smoke run)")
    if seeds is not None and not seeds:
        raise DiffmixError("--seeds lists at least one seed, e.g. 2020,2021,2022")
    check_data(recipe, data)
    check_weights(recipe, chosen, pretrained)
    runner = Runner(recipe, data, model, storage.normalize(out), chosen, list(seeds or recipe.seeds), pretrained, clip)
    storage.claim_output(runner.layout.out, "recipe", runner.identity(), overwrite, inputs={
        "--data": None if data == BUILTIN_SAMPLE else data, "--model": storage.path_like(model),
        "--clip": storage.path_like(clip), "--pretrained": pretrained})
    timings = Timings(runner.layout.path(TIMINGS_JSON),
                      {"recipe": recipe.name, "methods": chosen, "seeds": runner.seeds})
    written = runner.run(timings)
    table.print_summary(written, timings.steps, time.perf_counter() - started)
    return {"steps": timings.steps, "report": written}
