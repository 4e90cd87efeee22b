"""The readers of the artifacts between stages (synthetic.py, scores.py): what each says of an output
that is not the artifact it reads. No Ray, no model: milliseconds."""

from __future__ import annotations

import json

import pytest

from diffmix_ray import scores, synthetic
from diffmix_ray.contracts import MANIFEST_JSON
from diffmix_ray.errors import DiffmixError


def test_a_folder_without_generate_manifest_is_refused_naming_the_option(tmp_path):
    with pytest.raises(DiffmixError, match=r"^--synthetic .* holds no manifest.json: it is not a `diffmix-ray "
                                           r"generate` output"):
        synthetic.open_with_dataset(str(tmp_path), flag="--synthetic")
    with pytest.raises(DiffmixError, match=r"^/.* holds no manifest.json"):  # no option: the folder alone
        synthetic.read_manifest(str(tmp_path))


def test_a_manifest_that_records_no_dataset_asks_for_dataset(tmp_path):
    (tmp_path / MANIFEST_JSON).write_text(json.dumps({"identity": {}}))
    with pytest.raises(DiffmixError, match="records no dataset: pass --dataset"):
        synthetic.open_with_dataset(str(tmp_path))


def test_the_recorded_dataset_is_the_one_opened(tmp_path):
    (tmp_path / MANIFEST_JSON).write_text(json.dumps({"identity": {"dataset": str(tmp_path / "gone")}}))
    with pytest.raises(DiffmixError, match=r"gone is not a canonical dataset"):
        synthetic.open_with_dataset(str(tmp_path))


def test_scores_are_told_from_a_generate_output_by_their_manifest(tmp_path):
    assert scores.read_manifest(str(tmp_path)) is None and not scores.is_scores_output(str(tmp_path))
    (tmp_path / MANIFEST_JSON).write_text(json.dumps({"identity": {"dataset": "d"}, "counts": {}}))
    assert not scores.is_scores_output(str(tmp_path))
    (tmp_path / MANIFEST_JSON).write_text(json.dumps({"synthetic_fingerprint": "f", "columns": []}))
    assert scores.is_scores_output(str(tmp_path))
