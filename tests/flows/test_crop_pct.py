"""``--crop-pct``: the validation crop a user picks reaches training's validation transform and
the bundle's manifest (so scoring crops the same way), from the one options declaration."""

from __future__ import annotations

import sys

import pytest
from colour_images import colour_folder
from prefect.utilities.callables import parameter_schema
from safetensors.torch import load_file
from typer.testing import CliRunner

import training.recipes.image as image_recipe
from export.bundle import load_bundle, resolve_bundle
from export.pixels import Preprocessing, decode_for_model
from flows.cli import app, main
from training.data.images import from_folder


def test_crop_pct_is_a_flow_parameter_and_a_bad_value_is_one_line(monkeypatch, capsys):
    from flows.train_flows import train_image_model_flow

    schema = parameter_schema(train_image_model_flow).model_dump()["properties"]
    assert "crop_pct" in schema and schema["crop_pct"].get("default") is None
    monkeypatch.setattr(sys, "argv", ["lensflow", "train", "images", "missing",
                                      "--crop-pct", "1.5"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --crop-pct: Input should be less than or equal to 1 (got 1.5)"


@pytest.mark.slow
def test_crop_pct_reaches_the_validation_transform_and_the_manifest(tmp_path, monkeypatch):
    seen = []
    build = image_recipe.build_image_loaders

    def spy(data, preprocessing, **kwargs):
        seen.append(preprocessing)
        return build(data, preprocessing, **kwargs)

    monkeypatch.setattr(image_recipe, "build_image_loaders", spy)
    folder = colour_folder(tmp_path / "images")
    result = CliRunner().invoke(app, [
        "train", "images", str(folder), "--arch", "resnet18", "--weights", "none",
        "--size", "32", "--crop-pct", "0.5", "--bs", "4", "--freeze-epochs", "0",
        "--epochs", "1", "--lr", "1e-3", "--workers", "0", "--patience", "0",
        "--out", str(tmp_path / "train"), "--registry", str(tmp_path / "reg"),
        "--name", "colours"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # 32 / 0.5: the resize the 40-pixel images get before the centre 32 is cut (default: 37).
    assert [p.resize_size for p in seen] == [64]
    bundle = load_bundle(resolve_bundle(str(tmp_path / "reg" / "colours")))
    assert bundle.manifest["preprocessing"]["resize_size"] == 64
    assert bundle.manifest["preprocessing"]["input_size"] == 32
    # The parity sample the bundle was checked on is cut the way scoring will cut.
    sample = load_file(str(tmp_path / "train" / image_recipe.VALID_SAMPLE_FILE))["images"]
    first = from_folder(folder, valid_pct=0.2, seed=42).valid[0].path
    want = decode_for_model(first, Preprocessing.from_dict(bundle.manifest["preprocessing"]))
    assert (sample[0].numpy() == want).all()
