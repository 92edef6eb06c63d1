"""``lensflow import-model``: a state dict trained with plain PyTorch → bundle → nightly Parquet.

The done-when of "bring your own model": the Parquet predictions of ``lensflow score images``
are the model's own eager predictions (top-1 all equal, probabilities within the parity
tolerances). Then the one-line refusals of the usual mistakes, and the other tasks' manifests.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
import torchvision
from plain_torch_model import (
    ARCH,
    CLASSES,
    assert_scored_like_eager,
    make_tinted_images,
    train_plain_model,
)
from safetensors.torch import save_file

from export.bundle import current_version, load_bundle


def lensflow(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console entry in-process: (exit code, stdout, stderr)."""
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["lensflow", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *needles: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
def test_a_plain_pytorch_model_scores_to_parquet_as_it_predicts_eagerly(tmp_path, monkeypatch,
                                                                        capsys):
    train = tmp_path / "train"
    make_tinted_images(train, 8)
    model = train_plain_model(train)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    inbox = make_tinted_images(tmp_path / "inbox", 6, seed=1, by_class=False)

    code, out, err = lensflow(
        monkeypatch, capsys, "import-model", checkpoint, "--arch", f"timm/{ARCH}",
        "--classes", tmp_path / "classes.txt", "--registry", tmp_path / "reg", "--name", "byo",
        "--sample-images", train, "--input-size", 32, "--no-pt2")
    assert code == 0, err
    assert "Parity passed" in out and "promoted:" in out
    bundle = load_bundle(tmp_path / "reg" / "byo" / current_version(tmp_path / "reg", "byo"))
    manifest = bundle.manifest
    assert manifest["classes"] == list(CLASSES)
    # The architecture's own recipe at 32 px: timm's mean/std and floor(32 / crop_pct 0.95).
    assert manifest["preprocessing"]["resize_size"] == 33
    assert manifest["preprocessing"]["mean"] == pytest.approx([0.5, 0.5, 0.5])
    weights = manifest["lineage"]["weights"]
    assert weights["file"] == "model.pt"
    assert weights["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["lineage"]["parity_sample"]["images"] == 16
    parity = json.loads(bundle.file("parity.json").read_text())
    assert parity["inputs"] == "real and seeded random"

    code, out, err = lensflow(monkeypatch, capsys, "score", "images", tmp_path / "inbox",
                              "--model", tmp_path / "reg" / "byo", "--out", tmp_path / "out",
                              "--run-date", "2026-11-30", "--workers", 0)
    assert code == 0, err
    partition = tmp_path / "out" / "image_predictions" / "run_date=2026-11-30"
    worst = assert_scored_like_eager(partition, model, inbox)
    print(f"largest probability difference, Parquet vs eager: {worst:.2e}")
