"""`diffmix-ray run tiny` end to end in its own process and its own local Ray: SIGKILLed (with its
whole session) while generating, then rerun: the finished steps are skipped on their stages'
completion markers, the cut one resumes, the rest runs, and the report holds the table.

Lean on purpose (a Ray Train fit costs ~15 s, a translation actor ~4 s): DA-Fusion alone (a TI bank,
per-image generation, own-source replacement: every kind of step), one seed. test_recipes.py covers
the rest without Ray; test_ops.py runs real only as a Ray job."""

from __future__ import annotations

import json
import os

import pytest

from diffmix_ray import storage
from diffmix_ray.contracts import CONCEPTS_JSON, DATASET_JSON, SUCCESS

from tests.generate.test_faults import wait_for
from tests.generate.test_ray import cli_process, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

METHODS = "da-fusion"


def test_run_resumes_after_a_kill_mid_way_and_reports_the_table(tmp_path):
    out = tmp_path / "run"
    args = ["run", "tiny", "--out", str(out), "--methods", METHODS, "--seeds", "0"]
    plan = out / "synthetic" / "da-fusion" / "plan"
    with cli_process(args, str(tmp_path / "log1")) as proc:
        wait_for(lambda: proc.poll() is not None or plan.is_dir(), timeout=420, what="generation to start")
        assert proc.poll() is None, open(tmp_path / "log1").read()[-3000:]
        # leaving the block SIGKILLs the driver's whole session (its Ray included) mid-way
    assert (out / "banks" / "da-fusion" / CONCEPTS_JSON).exists()
    assert not (out / "synthetic" / "da-fusion" / SUCCESS).exists()

    rc, log = run_cli(args, str(tmp_path / "log2"), timeout=600)
    assert rc == 0, log[-4000:]

    first, second = json.loads((out / "timings.json").read_text())["invocations"]
    status = {s["step"]: s["status"] for s in second["steps"]}
    assert status == {"prepare": "skipped", "finetune da-fusion": "skipped", "generate da-fusion": "ran",
                      "train-cls da-fusion seed 0": "ran", "report": "ran"}
    assert [s["step"] for s in first["steps"]] == ["prepare", "finetune da-fusion"]  # what finished before the kill
    for marker in (out / "dataset" / DATASET_JSON, out / "synthetic" / "da-fusion" / SUCCESS,
                   out / "classifiers" / "da-fusion" / "seed-0" / SUCCESS):
        assert marker.exists(), marker

    bank = json.loads((out / "banks" / "da-fusion" / CONCEPTS_JSON).read_text())
    assert bank["mode"] == "ti" and bank["train_config"]["initializer_token"] == "the"
    manifest = storage.read_json(str(out / "synthetic" / "da-fusion" / "manifest.json"))
    assert manifest["config"]["per_image"] == 1 and manifest["counts"]["generated"] == 72  # one per train image
    metrics = json.loads((out / "classifiers" / "da-fusion" / "seed-0" / "metrics.json").read_text())
    assert metrics["synthetic_sampling"] == "own-source" and metrics["p"] == 0.5

    table = (out / "report" / "table.md").read_text()
    assert "## tiny: sample shapes" in table
    assert "| Method | Top-1 (%, last epoch) | Δ vs Real only | Seeds |" in table
    assert "| DA-Fusion |" in table and "| generate da-fusion |" in table
    assert "| DA-Fusion |" in log and "steps run: 3, skipped as complete: 2" in log  # printed at the end
    assert {"table.md", "table.html", "methods.png", "accuracy.png", "contact-da-fusion.png"} <= \
        set(os.listdir(out / "report"))
    print(table)  # the table and the wall times, for the record (pytest -s)
