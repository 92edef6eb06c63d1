"""A bundle says how it was made: options, a data fingerprint and the code version."""

from __future__ import annotations

import json
import os

import pytest
from colour_images import colour_folder
from PIL import Image

from export.bundle import load_bundle
from training.data.images import from_folder
from training.recipes.image import image_data_fingerprint, train_image_model
from training.recipes.options import ImageTrainOptions
from training.recipes.publish import export_training_output
from training.recipes.training_output import code_version, fingerprint_path, write_json


def test_training_output_json_is_strict_with_nan_as_null(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": (2,)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None],
                                                             "c": [2]}


def test_fingerprint_of_a_file_follows_its_contents_and_of_a_folder_its_files(tmp_path):
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user,item,rating\n1,2,3\n")
    before = fingerprint_path(ratings)
    ratings.write_text("user,item,rating\n1,2,4\n")
    assert fingerprint_path(ratings)["sha256"] != before["sha256"]
    assert before["basis"] == "contents"
    folder = fingerprint_path(tmp_path)
    (tmp_path / "more.csv").write_text("x")
    assert fingerprint_path(tmp_path)["sha256"] != folder["sha256"]


def test_code_version_names_the_package_version_and_the_checkouts_commit(monkeypatch):
    import subprocess
    from importlib import metadata

    from paths import REPO

    import training.recipes.training_output as training_output

    # The commit of this checkout (a tarball of the sources has none).
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() if (REPO / ".git").exists() else None
    code_version.cache_clear()  # computed once per process; this test asks afresh
    assert code_version() == {"lensflow": metadata.version("lensflow"), "git_commit": head}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(training_output.subprocess, "run", no_git)  # an installed wheel
    code_version.cache_clear()
    try:
        assert code_version() == {"lensflow": metadata.version("lensflow"), "git_commit": None}
    finally:
        code_version.cache_clear()


@pytest.mark.slow
def test_exported_manifest_carries_the_lineage_of_the_training_run(tmp_path):
    root = colour_folder(tmp_path / "images")
    data = from_folder(root, valid_pct=0.25, seed=0)
    options = ImageTrainOptions(arch="resnet18", weights="none", size=32, bs=4,
                                freeze_epochs=1, epochs=1, lr=1e-3, patience=0, workers=0,
                                unfrozen_lr_factor=2.0)
    result = train_image_model(data, tmp_path / "train", options, seed=1)

    exported = export_training_output(result.out_dir, tmp_path / "reg", "colours")
    lineage = load_bundle(exported.bundle_path).manifest["lineage"]
    assert lineage["task"] == "single_label"
    assert lineage["options"] == options.updated(seed=1).model_dump()
    assert lineage["code"] == code_version()
    # The LR of each stage and why, from the option the recipe handed to fine_tune.
    unfrozen = lineage["lr_choice"]["unfrozen"]
    assert unfrozen["lr"] == pytest.approx(2e-3) and unfrozen["factor"] == 2.0
    assert lineage["lr_choice"]["frozen"]["why"] == "given: 0.001"
    assert lineage["data"]["files"] == 12
    assert lineage["data"]["sha256"] == image_data_fingerprint(data)["sha256"]

    changed = root / "red" / "0.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    assert image_data_fingerprint(from_folder(root, valid_pct=0.25, seed=0))["sha256"] != \
        lineage["data"]["sha256"]
