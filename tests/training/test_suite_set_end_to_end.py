"""One real run with no tuning flags on a set from the quality suite that nobody tuned the
defaults on (brain MRI: 161 training scans, tumour or not), through the CLI: the head starts from
a probe, that start is validated as epoch 0, the body trains under the pretrained BatchNorm
statistics, and the model learned (smaller input than the default, to keep the suite fast)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow


def test_brain_mri_with_no_tuning_flags_learns_from_a_validated_probe_start(shared_data,
                                                                            tmp_path):
    result = CliRunner().invoke(app, [
        "train", "images", str(shared_data / "brain-mri-tumor"), "--size", "96",
        "--workers", "0", "--out", str(tmp_path / "brain")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "brain"
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    lineage = json.loads((out / "lineage.json").read_text())
    start = history["head_init"]
    assert start["kind"] == "probe" and set(start["cv_loss_by_prior"]) == {"zero", "classifier"}
    epochs = history["history"]
    # The probe with more right answers on validation (then lower loss) is the start.
    chosen = min(start["valid_loss_by_prior"], key=lambda k: (
        -start["valid_accuracy_by_prior"][k], start["valid_loss_by_prior"][k]))
    assert epochs[0]["valid_loss"] == pytest.approx(start["valid_loss_by_prior"][chosen],
                                                    rel=1e-5)
    assert epochs[0]["metrics"]["accuracy"] == start["valid_accuracy_by_prior"][chosen]
    assert [e["stage"] for e in epochs] == ["start"] + ["unfrozen"] * (len(epochs) - 1)
    assert len(epochs) >= 3  # the start and at least two epochs before patience could stop
    assert lineage["options"]["bn_stats"] == "auto" and lineage["options"]["freeze_epochs"] == 0
    # 25 of the 40 validation scans show a tumour: always answering "yes" scores 0.625.
    assert metrics["accuracy"] >= 0.75
    # The loss says when to stop; the most accurate epoch (lower loss breaking ties) is kept.
    best = min(epochs, key=lambda e: (-e["metrics"]["accuracy"], e["valid_loss"]))
    assert history["best_epoch"] == best["epoch"]
    assert metrics["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
