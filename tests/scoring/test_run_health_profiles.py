"""Run profiles merge exactly and travel (JSON, pickle); the drift measures behave; a
recommender whose top-k collapses onto a few items is flagged by its item exposure."""

from __future__ import annotations

import json
import pickle
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from export.convert import export_bundle
from scoring.recommendations import score_recommendations
from scoring.run_health.drift import DriftThresholds, chi_square_tail, drift_of
from scoring.run_health.figures import figures, quantile
from scoring.run_health.image_profile import ImageProfiler, content_of
from scoring.run_health.profile import Distribution, RunProfile, bin_counts, merge_profiles
from training.models.collab import DotProductBias

DAY1, DAY2 = date(2026, 11, 1), date(2026, 11, 2)


def shard_profile(rng: np.random.Generator, n: int) -> RunProfile:
    profiler = ImageProfiler("regression", [])
    sample = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    sample[: n // 4] = 7  # some near-constant frames
    profiler.add(rng.integers(1_000, 900_000, n).tolist(), rng.integers(10_000, 9_000_000, n),
                 sample, [(0, "UnidentifiedImageError: cannot identify image file")],
                 None, rng.normal(3.0, 2.0, (n, 2)) * 1e3)
    return profiler.profile()


def test_profiles_merge_exactly_in_any_order_and_round_trip_through_json_and_pickle():
    rng = np.random.default_rng(0)
    shards = [shard_profile(rng, n) for n in (5, 17, 64, 1)]
    merged = merge_profiles(shards)
    assert merge_profiles(reversed(shards)) == merged
    assert merge_profiles([merge_profiles(shards[:2]), merge_profiles(shards[2:])]) == merged
    assert RunProfile.from_dict(json.loads(json.dumps(merged.to_dict()))) == merged
    assert pickle.loads(pickle.dumps(merged)) == merged
    outcome = merged.distribution("rows.outcome").as_mapping()
    assert outcome == {"scored": 87, "UnidentifiedImageError": 4}
    moment = merged.moment("predictions.output.0")
    assert moment.count == 87 and abs(moment.mean - 3000) < 700 and 1000 < moment.std < 3000
    assert figures(merged)["inputs.near_constant_share"] == pytest.approx(
        (1 + 4 + 16 + 0) / 87)


def test_content_tells_colour_grayscale_and_near_constant_apart():
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    gray = np.repeat(rng.integers(0, 256, (1, 16, 16, 1), dtype=np.uint8), 3, axis=3)
    flat = np.full((1, 16, 16, 3), (30, 60, 200), dtype=np.uint8)
    _, content = content_of(np.concatenate([colour, gray, flat]))
    assert content.tolist() == [0, 1, 2]


def test_drift_is_zero_for_the_same_shares_and_flags_a_large_real_shift_only():
    same = Distribution.categorical("x", {"a": 50, "b": 50})
    twice = Distribution.categorical("x", {"a": 100, "b": 100})
    assert drift_of(same, twice, DriftThresholds()).psi == 0.0
    small_n = drift_of(Distribution.categorical("x", {"a": 3, "b": 1}),
                       Distribution.categorical("x", {"a": 1, "b": 3}), DriftThresholds())
    assert small_n.psi > 0.25 and not small_n.flagged  # large but within noise for 4 + 4
    moved = drift_of(Distribution.categorical("x", {"a": 300, "b": 100}),
                     Distribution.categorical("x", {"a": 100, "b": 300}), DriftThresholds())
    assert moved.flagged and moved.bins == ("a", "b") and moved.today == (0.75, 0.25)
    assert chi_square_tail(3.84, 1) == pytest.approx(0.05, abs=0.005)


def test_quantiles_come_from_the_fixed_bins():
    d = Distribution.histogram("p", "unit", bin_counts("unit", np.linspace(0.0, 0.999, 1000)))
    assert quantile(d, 0.5) == pytest.approx(0.5, abs=0.01)
    assert quantile(d, 0.05) == pytest.approx(0.05, abs=0.01)


def rec_bundle(root, *, collapsed: bool, n_users=120, n_items=60):
    """A dot-product recommender; ``collapsed``: the same model with five items' biases so
    large that every user's top-5 is those five."""
    torch.manual_seed(0)
    model = DotProductBias(n_users, n_items, 4, y_range=(0.5, 5.5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
        if collapsed:
            model.item_bias.weight[:5] += 50.0
    seen = root / "seen.parquet"
    pq.write_table(pa.table({"user_idx": pa.array([], pa.int32()),
                             "item_idx": pa.array([], pa.int32())}), seen)
    manifest = {"task": "collab", "users": list(range(n_users)),
                "items": [1000 + i for i in range(n_items)],
                "titles": [f"Item {i}" for i in range(n_items)], "id_type": "int64",
                "y_range": [0.5, 5.5], "model": model.config().to_dict(),
                "seen": {"file": "seen.parquet"}}
    return export_bundle(model, manifest, root / "registry", "movies", pt2=False,
                         extra_files={"seen.parquet": seen}).bundle_path


def test_a_recommender_whose_top_k_collapses_is_flagged_by_item_exposure(tmp_path):
    out = tmp_path / "out"
    before = rec_bundle(tmp_path, collapsed=False)
    first = score_recommendations(before, out, top_k=5, run_date=DAY1)
    assert first.health["decision"] == "no_baseline"
    again = score_recommendations(before, out, top_k=5, run_date=DAY1)
    assert again.health["decision"] == "ok"  # the same night rescored
    night = score_recommendations(rec_bundle(tmp_path, collapsed=True), out, top_k=5,
                                  run_date=DAY2, on_drift="warn")
    drifted = {d["measure"] for d in night.health["drift"] if d["flagged"]}
    assert "recommendations.item_exposure" in drifted
    assert "recommendations.users" not in drifted
    figure = {name: (today, before) for name, today, before in night.health["figures"]}
    coverage, gini = figure["recommendations.coverage"], figure["recommendations.exposure_gini"]
    assert coverage[0] < coverage[1] / 2 and gini[0] > gini[1] + 0.2


@pytest.mark.parametrize("task, measures", [
    ("multi_label", {"predictions.probability", "predictions.positive.ant",
                     "predictions.top1_label"}),
    ("regression", {"predictions.output.0", "predictions.output.1"}),
])
def test_multi_label_and_regression_runs_profile_their_own_outputs(task, measures, tmp_path):
    from flow_test_data import make_images
    from tiny_image_bundle import make_image_bundle

    from scoring.image_scoring import score_image_folder

    make_image_bundle(tmp_path / "registry", task=task, name="tiny")
    images = make_images(tmp_path / "images", 12)
    for day in (DAY1, DAY2):
        summary = score_image_folder(images, tmp_path / "registry" / "tiny", tmp_path / "out",
                                     run_date=day, workers=0)
    assert summary.health["decision"] == "ok"
    assert measures <= {d["measure"] for d in summary.health["drift"]}
    record = json.loads((tmp_path / "out" / "_runs" / f"{summary.run_id}.json").read_text())
    profile = RunProfile.from_dict(record["health"]["profile"])
    if task == "regression":
        moment = profile.moment("predictions.output.0")
        assert moment.count == 12 and np.isfinite(moment.std)
        assert {"predictions.output.0.mean", "predictions.output.0.p50"} <= {
            name for name, _, _ in summary.health["figures"]}
    else:
        assert profile.distribution("predictions.probability").total == 12 * 6


def test_header_pixels_agree_with_pillow_on_every_kind_of_file(tmp_path):
    from PIL import Image

    from scoring.image_batches import header_pixels

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    kinds = {"a.png": {}, "b.jpg": {"quality": 80}, "c.jpg": {"progressive": True},
             "d.gif": {}, "e.webp": {}, "f.bmp": {}}
    for name, options in kinds.items():
        Image.fromarray(pixels).save(tmp_path / name, **options)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the header's size is the stored one either way
    Image.fromarray(pixels).save(tmp_path / "g.jpg", exif=exif.tobytes())
    for path in sorted(tmp_path.iterdir()):
        with open(path, "rb") as f:
            assert header_pixels(f) == 37 * 53, path.name


def test_decoding_processes_and_threads_give_the_same_profile(tmp_path):
    from flow_test_data import make_images
    from tiny_image_bundle import make_image_bundle

    from scoring.image_scoring import score_image_folder

    make_image_bundle(tmp_path / "registry", name="tiny")
    images = make_images(tmp_path / "images", 10, size=50)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    profiles = []
    for workers in (1, 0):  # one decoding process; decoding threads
        summary = score_image_folder(images, tmp_path / "registry" / "tiny",
                                     tmp_path / f"out{workers}", run_date=DAY1, workers=workers)
        record = json.loads((tmp_path / f"out{workers}" / "_runs" / f"{summary.run_id}.json")
                            .read_text())
        profiles.append(RunProfile.from_dict(record["health"]["profile"]))
    assert profiles[0] == profiles[1]
    assert profiles[0].distribution("inputs.megapixels").total == 10
    assert sum(profiles[0].distribution("rows.outcome").counts) == 11
