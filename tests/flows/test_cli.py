"""The ``lensflow`` command as a user runs it: train → export → verify → promote → score.

One small real chain (a tiny timm backbone on drawn shapes) shared by the tests of this module,
plus the one-line errors a user sees for bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from export.bundle import current_version
from flows.demo_data import make_shapes_dataset

pytestmark = pytest.mark.slow


def lensflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"lensflow {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Train a tiny image model with --registry: export, parity, promote in one go."""
    root = tmp_path_factory.mktemp("cli")
    shapes = make_shapes_dataset(root / "shapes", n_train=12, n_valid=4, size=40)
    registry = root / "registry"
    proc = lensflow("train", "images", shapes, "--arch", "timm/mobilenetv3_small_050",
                    "--weights", "none", "--size", "32", "--bs", "8", "--freeze-epochs", "1",
                    "--epochs", "1", "--lr", "1e-3", "--out", root / "train",
                    "--registry", registry, "--name", "shapes", "--seed", "0")
    return {"root": root, "shapes": shapes, "registry": registry, "train": root / "train",
            "stdout": proc.stdout}


def test_train_writes_the_training_output_and_promotes_a_verified_bundle(chain):
    train = chain["train"]
    metrics = json.loads((train / "metrics.json").read_text())
    assert {"valid_loss", "accuracy", "error_rate", "confusion_matrix"} <= metrics.keys()
    assert metrics["accuracy"] == pytest.approx(1 - metrics["error_rate"])
    assert (train / "weights.safetensors").stat().st_size > 0
    assert json.loads((train / "model.json").read_text())["classes"] == [
        "circle", "square", "triangle"]
    history = json.loads((train / "history.json").read_text())["history"]
    assert [r["stage"] for r in history] == ["start", "frozen", "unfrozen"]
    assert {"learning_curve.png", "confusion_matrix.png"} <= {
        p.name for p in (train / "plots").iterdir()}

    current = current_version(chain["registry"], "shapes")
    bundle = chain["registry"] / "shapes" / current
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "single_label"
    assert manifest["classes"] == ["circle", "square", "triangle"]
    assert json.loads((bundle / "parity.json").read_text())["passed"] is True
    assert "Parity passed" in chain["stdout"]


def test_verify_passes_on_the_promoted_bundle(chain):
    proc = lensflow("verify", chain["registry"] / "shapes")
    assert "hashes ok, parity passed" in proc.stdout


def test_score_images_writes_one_row_per_file_with_errors_recorded(chain, tmp_path):
    folder = tmp_path / "drop"
    (folder / "nested").mkdir(parents=True)
    for i, src in enumerate(sorted((chain["shapes"] / "valid").rglob("*.*"))[:5]):
        (folder / "nested" / f"{i}{src.suffix}").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    proc = lensflow("score", "images", folder, "--model", chain["registry"] / "shapes",
                    "--out", out, "--run-date", "2026-11-22", "--workers", "0")
    partition = out / "image_predictions" / "run_date=2026-11-22"
    assert (partition / "_SUCCESS").exists()
    table = ds.dataset(partition, format="parquet").to_table().to_pandas()
    assert len(table) == 6
    failed = table[table["error"].notna()]
    assert list(failed["path"]) == ["broken.jpg"]
    assert failed["pred_label"].isna().all()
    ok = table[table["error"].isna()]
    assert set(ok["pred_label"]) <= {"circle", "square", "triangle"}
    assert "6" in proc.stdout and "1" in proc.stdout


def test_verify_refuses_a_tampered_bundle_in_one_line(chain, tmp_path):
    import shutil

    copy = tmp_path / "reg" / "shapes"
    shutil.copytree(chain["registry"] / "shapes", copy)
    version = current_version(copy.parent, "shapes")
    onnx_file = copy / version / "model.onnx"
    onnx_file.chmod(0o644)
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    proc = lensflow("verify", copy, check=False)
    assert proc.returncode == 2
    assert "model.onnx" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["train", "images", "/no/such/folder", "--weights", "none"], "/no/such/folder"),
    (["score", "images", "/no/such/folder", "--model", "/no/such/reg/m", "--out", "/tmp/x"],
     "/no/such"),
    (["verify", "/no/such/bundle"], "/no/such/bundle"),
    (["train", "images", "/no/such/folder", "--lr", "fastest"], "--lr: "),
    (["train", "ratings", "/no/such/file", "--epochs", "0"], "--epochs: "),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    proc = lensflow(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_run_date_is_refused_before_any_work(chain, tmp_path):
    proc = lensflow("score", "images", chain["shapes"], "--model", chain["registry"] / "shapes",
                    "--out", tmp_path, "--run-date", "yesterday", check=False)
    assert proc.returncode == 2
    assert "--run-date" in proc.stderr
    assert not (tmp_path / "image_predictions").exists()


def test_ratings_chain_trains_exports_and_scores_top_k(tmp_path):
    from flows.demo_data import make_planted_ratings

    ratings = make_planted_ratings(tmp_path / "ratings", n_users=60, n_items=80, seed=1)
    registry, out = tmp_path / "registry", tmp_path / "out"
    lensflow("train", "ratings", ratings, "--factors", "8", "--epochs", "2", "--lr", "5e-3",
             "--out", tmp_path / "train", "--registry", registry, "--name", "movies")
    # The same training output exports again through the generic export command.
    exported = lensflow("export", tmp_path / "train", "--registry", registry, "--name", "again")
    assert "bundle:" in exported.stdout
    lensflow("score", "recommendations", "--model", registry / "movies", "--out", out,
             "--top-k", "3", "--run-date", "2026-11-22")
    topk = ds.dataset(out / "recommendations_topk" / "run_date=2026-11-22",
                      format="parquet").to_table().to_pandas()
    assert topk.groupby("user_id")["rank"].apply(list).map(lambda r: r == [1, 2, 3]).all()
    assert topk["user_id"].nunique() == 60


def test_sharded_scoring_through_the_flow_matches_the_single_process_run(chain, tmp_path):
    model = chain["registry"] / "shapes"
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    env_free = ["--run-date", "2026-11-22", "--workers", "0"]
    lensflow("score", "images", chain["shapes"], "--model", model, "--out", single, *env_free)
    lensflow("score", "images", chain["shapes"], "--model", model, "--out", sharded,
             "--shards", "3", *env_free)
    cols = ["path", "pred_label", "pred_score"]

    def rows(out):
        table = ds.dataset(out / "image_predictions" / "run_date=2026-11-22",
                           format="parquet").to_table(columns=cols).to_pandas()
        return table.sort_values("path").reset_index(drop=True)

    assert rows(sharded).equals(rows(single))
    assert len(list((sharded / "image_predictions" / "run_date=2026-11-22").glob("part-*"))) > 1
