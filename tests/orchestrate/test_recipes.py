"""Recipes without Ray: the shipped ones load and validate with the stages' own config classes, the
schema refuses what it does not know, the values that come from the paper land where they should,
`recipe list/show` print them, and `run` refuses bad input before it touches the output."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from typer.testing import CliRunner

from diffmix_ray.cli import app
from diffmix_ray.errors import DiffmixError
from diffmix_ray.orchestrate import recipes
from diffmix_ray.orchestrate.run import Layout, run_recipe
from diffmix_ray.orchestrate.table import Row, table_rows

from tests import fixtures as fx

PAPER = {f"conventional-{d}-{b}" for d in ("cub", "aircraft", "flowers", "cars", "dogs")
         for b in ("resnet50-448", "vit-b16-384")} | {f"few-shot-cub-{k}shot" for k in (1, 5, 10)} | \
        {f"long-tail-{d}-if{r}" for d in ("cub", "flowers") for r in (100, 50, 10)}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_paper_setting_has_a_recipe_that_validates():
    from diffmix_ray.classify.model import check_arch

    names = {name for name, _, _ in recipes.catalogue()}
    assert PAPER | {"tiny"} <= names
    for name in sorted(PAPER | {"tiny"}):
        r = recipes.load(name)  # every stage config built and validated by the stage's class
        for method in r.methods.values():
            check_arch(method.train_cls["arch"])


def test_the_sample_study_recipe_runs_the_sample_world_on_the_sample_models():
    r = recipes.load("sample")
    assert (r.model, r.clip, r.data, r.derive["shots"]) == ("sample", "sample", "builtin:sample:12x60", 5)
    assert r.rows == ("real-only", "cutmix", "real-filtering", "da-fusion", "diff-mix") and len(r.seeds) >= 3
    assert recipes.builtin_sample(r.data) == (12, 60) and recipes.builtin_sample("builtin:sample") == (4, 24)
    assert recipes.builtin_sample("/data/cub") is None
    for bad in ("builtin:sample:13x5", "builtin:sample:12", "builtin:sample:axb", "builtin:sample:3x0"):
        with pytest.raises(DiffmixError, match="write builtin:sample:CLASSESxIMAGES, e.g. builtin:sample:12x60"):
            recipes.builtin_sample(bad)


def test_the_demo_recipe_translates_at_four_strengths_and_filters_with_clip():
    """`diffmix-ray demo` runs this recipe: the contact sheet needs weak and strong translations, the report a
    score filter (so the CLIP steps run), and the sample models (random ones would show nothing)."""
    r = recipes.load("demo")
    assert (r.model, r.clip, r.data, r.rows) == ("sample", "sample", "builtin:sample:12x10", ("diff-mix-filtered",))
    generation = r.generations["diff-mix"]
    assert sorted(generation.generate["strength_set"]) == [0.3, 0.5, 0.7, 0.9] and len(r.seeds) == 1
    assert r.methods["diff-mix-filtered"].train_cls["synthetic_filter"]


def test_paper_values_land_where_they_should():
    cub = recipes.load("conventional-cub-resnet50-448")
    assert cub.format == "cub" and cub.prepare["val_fraction"] == 0
    cls = cub.methods["diff-mix"].train_cls
    assert (cls["arch"], cls["res_mode"], cls["lr"], cls["epochs"], cls["augment"], cls["select"]) == \
        ("resnet50", 448, 0.025, 120, "reference", "last")
    assert recipes.load("conventional-dogs-vit-b16-384").methods["real-only"].train_cls["lr"] == 1e-5
    assert recipes.load("conventional-flowers-resnet50-448").prepare["split"] == "reference"
    assert cub.rows == ("real-only", "cutmix", "mixup", "real-aug", "real-mix", "real-gen", "real-filtering", "da-fusion",
                        "diff-aug", "diff-gen", "diff-mix", "diff-mix+cutmix")
    # Real-Filtering: Real-Gen's images kept by the reference's object score, all but the lowest 10%
    rf = cub.methods["real-filtering"]
    assert (rf.synthetic, rf.train_cls["synthetic_filter"], rf.scores()) == \
        (("real-gen",), "clip_object_prob:p10-100", [("real-gen", "default")])
    # DA-Fusion as DA-Fusion: TI only from "the", 1,000 steps x batch 4 per class, lr 5e-4 scaled, M = 10,
    # own-source replacement at alpha 0.5
    daf = cub.banks["da-fusion"].config("d", "o", "sd15", num_classes=200)
    assert (daf.mode, daf.initializer_token, daf.max_steps, daf.ti_lr) == ("ti", "the", 4000 * 200 // 8, 5e-4 * 8)
    gen = cub.generations["da-fusion"].config("d", "sd15", "bank", "o")
    assert (gen.mode, gen.per_image, gen.multiplier) == ("da-fusion", 10, None)
    assert cub.methods["da-fusion"].train_cls.items() >= {"synthetic_pick": "own-source", "synthetic_p": 0.5}.items()
    diffmix = cub.banks["diffmix"].config("d", "o", "sd15", num_classes=200)
    assert (diffmix.mode, diffmix.rank, diffmix.max_steps, diffmix.lr, diffmix.batch_size * diffmix.workers) == \
        ("ti+lora", 10, 35000, 5e-5, 8)
    lt = recipes.load("long-tail-flowers-if50")
    assert lt.derive == {"long_tail": "reference", "seed": 0, "imbalance_ratio": 50}
    assert {"drw", "balanced-softmax", "drw+diff-mix"} <= set(lt.rows)
    assert lt.methods["drw"].train_cls.items() >= {"schedule": "step", "epochs": 200, "lr": 0.005, "loss": "drw"}.items()
    assert recipes.load("few-shot-cub-5shot").derive == {"seed": 0, "shots": 5}


def test_recipe_list_and_show():
    listing = CliRunner().invoke(app, ["recipe", "list"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    for name in ("conventional-cub-resnet50-448", "few-shot-cub-1shot", "long-tail-cub-if100", "tiny"):
        assert name in listing.output
    shown = CliRunner().invoke(app, ["recipe", "show", "long-tail-cub-if100"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "imbalance_ratio: 100" in shown.output and "CUB_200_2011/" in shown.output
    assert "drw+diff-mix" in shown.output and "extends" not in shown.output  # the merged recipe


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    result = CliRunner().invoke(app, ["run", "conventional-cub", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = _flat(result.output)
    assert "no recipe named 'conventional-cub'" in text and "Close: conventional-cub-resnet50-448" in text
    assert "tiny" in text and "long-tail-flowers-if10" in text
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# The schema refuses what it does not know
# ---------------------------------------------------------------------------------------------
def _recipe_file(tmp_path, text: str, name: str = "mine.yaml") -> str:
    base = tmp_path / "_base.yaml"
    if not base.exists():  # the shipped base, so the edits below are the only difference
        base.write_text(open(os.path.join(os.path.dirname(recipes.__file__), "..", "..", "jobs", "configs",
                                          "paper", "_base.yaml")).read())
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """
    extends: _base
    prepare: {format: imagefolder, super_class: shape}
    train_cls: {arch: test_resnet}
    rows: [real-only, diff-mix]
"""


@pytest.mark.parametrize("edit, message", [
    ("epochs: 3\n", r"unknown key\(s\) \['epochs'\]; valid: description, table"),
    ("train_cls: {arch: test_resnet, epoch: 3}\n", "train_cls: unknown option 'epoch'; valid: .*epochs"),
    ("finetune: {lr: 5e-5}\n", r"finetune.lr: '5e-5' is a str, expected int or float \(YAML reads 5e-5 as text"),
    ("train_cls: {arch: test_resnet, dataset: /x}\n", r"train_cls.dataset is set by `diffmix-ray run` itself"),
    ("methods: {diff-mix: {synthetic: diff-mixx}}\n", r"methods.diff-mix.synthetic names undefined generation\(s\) "
                                                      r"\['diff-mixx'\]"),
    ("rows: [real-only, dif-mix]\n", r"rows name undefined method\(s\) \['dif-mix'\]"),
    ("generations: {diff-mix: {bank: null}}\n", "generations.diff-mix: mode diff-mix translates with a fine-tuned "
                                                "concept bank: name one with `bank:`"),
    ("banks: {da-fusion: {mode: ti+lora, token_schedule: joint}}\n",
     "mode da-fusion uses a TI-only bank; bank da-fusion trains ti\\+lora"),
    ("banks: {da-fusion: {mode: ti+lora}}\n", "token_schedule per-class .* use --mode ti, or token_schedule joint"),
    ("banks: {da-fusion: {max_steps: 10}}\n", "images_per_class sets max_steps from the class count; give one"),
    ("train_cls: {arch: test_resnet, select: best}\n", "methods.real-only: --select 'best': choose val or last"),
    ("seeds: []\n", "seeds lists the classifier seeds"),
    ("prepare: {format: cub, split: reference}\n", "prepare: --split reference is the Diff-Mix code's seeded 50/50 "
                                                   "re-split of Flowers-102; --format cub has no such split"),
    ("methods: {real-filtering: {train_cls: {synthetic_filter: clip_object_prob>=p10}}}\n",
     "methods.real-filtering: --synthetic-filter 'clip_object_prob>=p10': threshold 'p10' is not a number"),
    ("methods: {real-filtering: {train_cls: {synthetic_filter: 'classifier_target_prob>=0.5'}}}\n",
     "real-filtering.train_cls.synthetic_filter classifier_target_prob>=0.5: a recipe's `score` steps score with CLIP only"),
    ("score: {clip: tiny}\n", r"score.clip is set by `diffmix-ray run` itself"),
    ("score: {batch_size: 0}\n", r"score: --batch-size and --rows-per-file must be >= 1"),
    ("clip: 3\n", r"clip must be text, not 3"),
])
def test_bad_recipes_are_refused_with_the_key_and_the_fix(tmp_path, edit, message):
    path = _recipe_file(tmp_path, GOOD + "    " + edit)
    with pytest.raises(DiffmixError, match=message):
        recipes.load(path)


def test_matrix_files_expand_and_refuse_stray_cells(tmp_path):
    path = _recipe_file(tmp_path, GOOD + """
    name: "mine-{size}"
    table: "mine at {size}"
    matrix:
      size:
        8: {train_cls: {img_size: 8}}
        16: {train_cls: {img_size: 16}}
    cells:
      16: {train_cls: {epochs: 7}}
    """)
    small, big = recipes.load(f"mine-8@{path}"), recipes.load(f"mine-16@{path}")
    assert small.methods["real-only"].train_cls["img_size"] == 8 and small.table == "mine at 8"
    assert big.methods["real-only"].train_cls.items() >= {"img_size": 16, "epochs": 7}.items()
    with pytest.raises(DiffmixError, match=r"defines 2 recipes \(mine-8, mine-16\): pick one as NAME@"):
        recipes.load(path)
    stray = _recipe_file(tmp_path, GOOD + """
    matrix: {size: {8: {}}}
    cells: {32: {}}
    """, "stray.yaml")
    with pytest.raises(DiffmixError, match=r"cells \['32'\] match no matrix combination"):
        recipes.load(stray)
    loop = _recipe_file(tmp_path, "extends: loop\n", "loop.yaml")
    with pytest.raises(DiffmixError, match="extends itself"):
        recipes.load(loop)


# ---------------------------------------------------------------------------------------------
# run: bad input refused before the output is touched
# ---------------------------------------------------------------------------------------------
def test_data_that_does_not_match_the_recipes_format(tmp_path):
    cub = fx.make_cub(str(tmp_path / "CUB_200_2011"), num_classes=2, per_class=2)
    out = str(tmp_path / "o")
    with pytest.raises(DiffmixError, match=r"recipe tiny reads --data as imagefolder .* but .*CUB_200_2011 looks like "
                                           r"cub \(it holds images.txt\)"):
        run_recipe(recipes.load("tiny"), out, data=cub)
    folder = str(tmp_path / "folder")
    os.makedirs(os.path.join(folder, "a"))
    with pytest.raises(DiffmixError, match=r"recipe long-tail-cub-if100 reads --data as cub \(CUB-200-2011 as "
                                           r"distributed.*\), but .*folder looks like imagefolder"):
        run_recipe(recipes.load("long-tail-cub-if100"), out, data=folder, model="tiny")
    assert not os.path.exists(out)


def test_run_names_what_is_missing(tmp_path):
    out = str(tmp_path / "o")
    cub = recipes.load("conventional-cub-resnet50-448")
    with pytest.raises(DiffmixError, match="recipe conventional-cub-resnet50-448 needs --data: CUB-200-2011 as"):
        run_recipe(cub, out)
    with pytest.raises(DiffmixError, match="needs --model for real-aug, real-mix, real-gen, real-filtering, da-fusion, diff-aug"):
        run_recipe(cub, out, data=str(tmp_path))
    with pytest.raises(DiffmixError, match="has no method 'diffmix'; its methods: real-only, cutmix"):
        run_recipe(cub, out, data=str(tmp_path), methods=["diffmix"])
    with pytest.raises(DiffmixError, match=r"needs --clip for real-filtering: the CLIP model their synthetic filter "
                                           r"scores real-gen with \(a CLIPModel folder or s3:// URI"):
        run_recipe(cub, out, data=str(tmp_path), model="tiny", methods=["real-only", "real-filtering"])
    result = CliRunner().invoke(app, ["run", "tiny", "--out", out, "--seeds", "1,x"])
    assert result.exit_code == 2 and "--seeds '1,x' must be whole numbers" in result.output
    assert not os.path.exists(out)


def test_a_different_recipe_at_the_same_out_is_refused(tmp_path):
    from diffmix_ray import storage
    from diffmix_ray.orchestrate.run import Runner

    out = str(tmp_path / "o")
    tiny = recipes.load("tiny")
    runner = Runner(tiny, "builtin:sample", "tiny", out, ["real-only"], [0], None)
    storage.claim_output(out, "recipe", runner.identity(), inputs={})
    (tmp_path / "o" / "dataset").mkdir()
    (tmp_path / "o" / "dataset" / "dataset.json").write_text("{}")  # a result: the claim is owned
    other = Runner(tiny, "builtin:sample", "tiny:1", out, ["real-only"], [0], None)
    with pytest.raises(DiffmixError, match="holds a recipe run with a different config.*--overwrite"):
        storage.claim_output(out, "recipe", other.identity(), inputs={})
    # words, rows and seeds say what to run, not how: the same run; a setting is another run
    import dataclasses

    reworded = dataclasses.replace(tiny, content=tiny.content | {"description": "x", "rows": ["real-only"],
                                                                 "seeds": [5]})
    assert Runner(reworded, "builtin:sample", "tiny", out, ["real-only"], [5], None).identity() == runner.identity()
    longer = dataclasses.replace(tiny, content=tiny.content | {"train_cls": tiny.content["train_cls"] | {"epochs": 3}})
    assert Runner(longer, "builtin:sample", "tiny", out, ["real-only"], [0], None).identity() != runner.identity()


def test_a_filtering_method_gets_a_score_step_per_generation_and_name(tmp_path, monkeypatch):
    """real-filtering: generate real-gen, score it once (the tiny recipe's CLIP, its `score` options, the
    run's dataset), then train-cls on the scores; skipped, like every step, on the stage's own _SUCCESS."""
    import dataclasses

    from diffmix_ray.orchestrate.run import Runner
    from diffmix_ray.score import run as score_run

    tiny = recipes.load("tiny")
    out = str(tmp_path / "o")
    methods = ["real-gen", "real-filtering"]
    runner = Runner(tiny, "builtin:sample", "tiny", out, methods, [0], None, tiny.clip)
    steps = {s.name: s for s in runner.steps()}
    assert list(steps) == ["prepare", "generate real-gen", "score real-gen", "train-cls real-gen seed 0",
                           "train-cls real-filtering seed 0", "report"]
    assert steps["score real-gen"].marker == os.path.join(out, "synthetic", "real-gen", "scores", "default", "_SUCCESS")
    seen = []
    monkeypatch.setattr(score_run, "run_score", lambda cfg, **_: seen.append(cfg))
    steps["score real-gen"].work()
    assert [(c.synthetic, c.clip, c.name, c.dataset, c.batch_size) for c in seen] == \
        [(os.path.join(out, "synthetic", "real-gen"), "tiny", "default", os.path.join(out, "dataset"), 16)]
    cfg = tiny.methods["real-filtering"].config("d", "o", ("s",), 0, None)
    assert (cfg.synthetic_filter, cfg.score_names()) == (("clip_object_prob:p10-100",), ["default"])
    # two methods on other scores of the same generation: one score step each name, in order
    other = dataclasses.replace(tiny.methods["real-filtering"], name="rf-b32",
                                train_cls=tiny.methods["real-filtering"].train_cls | {"scores": "b32"})
    wider = dataclasses.replace(tiny, methods=tiny.methods | {"rf-b32": other})
    assert wider.scores_for(["real-filtering", "rf-b32", "real-filtering"]) == [("real-gen", "default"),
                                                                                ("real-gen", "b32")]
    assert "score real-gen (b32)" in [s.name for s in Runner(wider, "builtin:sample", "tiny", out, ["rf-b32"], [0],
                                                             None, "tiny").steps()]


def test_the_table_is_mean_and_std_over_seeds_in_row_order():
    def metrics(top1, groups=None):
        return {"summary": {"test_top1": top1, "test_shot_groups": groups}}

    rows = [Row("real-only", "Real only", [1, 2], [metrics(0.80), metrics(0.84)]),
            Row("diff-mix", "Diff-Mix", [1, 2], [metrics(0.85, {"many": 0.9, "medium": 0.8, "few": 0.5}),
                                                 metrics(0.87, {"many": 0.9, "medium": 0.8, "few": 0.7})])]
    header, body = table_rows(rows)
    assert header == ["Method", "Top-1 (%)", "Δ vs Real only", "Seeds", "Many", "Medium", "Few"]
    assert body[0][:4] == ["Real only", "82.00 ± 2.00", "—", "1,2"]
    assert body[1] == ["Diff-Mix", "86.00 ± 1.00", "+4.00", "1,2", "90.00", "80.00", "60.00"]
    assert Layout("s3://b/run").classifier("diff-mix", 2020) == "s3://b/run/classifiers/diff-mix/seed-2020"
    assert json.dumps(body)  # plain strings: what table.md/html print


def test_the_builtin_sample_is_prepared_beside_an_s3_output(s3_env):
    """--data builtin:sample with an s3:// --out: the sample is drawn, uploaded to <out>/raw and
    prepared from there (no Ray: only the prepare step)."""
    from diffmix_ray import canonical, storage
    from diffmix_ray.orchestrate.run import Runner

    out = s3_env.make_bucket("run") + "/tiny"
    runner = Runner(recipes.load("tiny"), "builtin:sample", "tiny", out, ["real-only"], [0], None)
    (prepare, *_, report) = runner.steps()
    prepare.work()
    assert storage.exists(prepare.marker) and len(storage.list_dir(f"{out}/raw")) == 4  # the 4 class folders
    info = canonical.open_dataset(f"{out}/dataset").info
    assert (info.num_classes, info.split_size("train"), info.split_size("test")) == (4, 72, 24)
    assert [s.name for s in runner.steps()] == ["prepare", "train-cls real-only seed 0", "report"]
