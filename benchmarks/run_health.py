"""Run health's false-alarm rate: how often a night *without* a shift is flagged.

Every image of a folder (default: the shared ants/bees train + val, 398 images) is scored once
with a bundle (default: the tests' tiny 2-class bundle; ``--model`` for a real one) and profiled
on its own; then, for ``--splits`` random splits, the profiles of the images on each side are
merged (exactly what a run's shards do) and compared at the default thresholds
(``scoring.options.HealthOptions``), as the breaker would:

- ``halves``: one random half as yesterday, the other as tonight (one baseline run);
- ``trailing``: the folder cut into ``drift_runs`` + 1 random parts, tonight one part and the
  baseline the other ``drift_runs`` pooled (the default trailing window).

A split is a false alarm when any distribution is flagged. Prints the rate per mode with a 95 %
Wilson interval, and which measures raised the alarms. Usage::

    python benchmarks/run_health.py                    # 500 splits per mode
    python benchmarks/run_health.py FOLDER --model REG/NAME --splits 2000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

from export.pixels import Preprocessing  # noqa: E402
from scoring.image_batches import decoded_batches  # noqa: E402
from scoring.image_folder import walk_images  # noqa: E402
from scoring.image_rows import RowBuilder  # noqa: E402
from scoring.image_scoring import open_image_bundle, score_output_name  # noqa: E402
from scoring.options import HealthOptions  # noqa: E402
from scoring.run_health.drift import DriftThresholds, compare  # noqa: E402
from scoring.run_health.image_profile import ImageProfiler, pixel_sample  # noqa: E402
from scoring.run_health.profile import RunProfile, merge_profiles  # noqa: E402
from scoring.shards import shard_runtime  # noqa: E402


def per_image_profiles(folder: Path, model: str | Path, batch_size: int = 32
                       ) -> list[RunProfile]:
    """One profile per image file of ``folder``, in walk order."""
    files = walk_images(folder)
    bundle = open_image_bundle(model)
    spec = Preprocessing.from_dict(bundle.manifest["preprocessing"])
    rt = shard_runtime(bundle, "onnx", "cpu", None)
    builder = RowBuilder(bundle, top_k=1, output=score_output_name(rt.output_names))
    profiles: list[RunProfile | None] = [None] * len(files)
    for batch in decoded_batches(files, spec, batch_size, 0, measure_inputs=True):
        outputs = rt.run(batch.images)[builder.output] if len(batch.indices) else None
        sample = pixel_sample(batch.images) if len(batch.indices) else None
        for j, i in enumerate(batch.indices.tolist()):
            one = ImageProfiler(builder.task, builder.classes, builder.thresholds)
            one.add([files[i].size], batch.pixels[j:j + 1], sample[j:j + 1], (),
                    outputs[j:j + 1])
            profiles[i] = one.profile()
        for i, error in batch.failed:
            one = ImageProfiler(builder.task, builder.classes, builder.thresholds)
            one.add([], None, None, [(i, error)], None)
            profiles[i] = one.profile()
    return profiles


def false_alarms(profiles: list[RunProfile], parts: int, splits: int,
                 thresholds: DriftThresholds, seed: int = 0) -> dict:
    """Split ``profiles`` at random ``splits`` times into ``parts`` parts: tonight is part 0,
    the baseline the others pooled; how often anything is flagged, and by what."""
    rng = np.random.default_rng(seed)
    alarms, by_measure = 0, Counter()
    for _ in range(splits):
        cut = np.array_split(rng.permutation(len(profiles)), parts)
        tonight = merge_profiles(profiles[i] for i in cut[0])
        baseline = merge_profiles(profiles[i] for part in cut[1:] for i in part)
        flagged = [d.measure for d in compare(tonight, baseline, thresholds) if d.flagged]
        alarms += bool(flagged)
        by_measure.update(flagged)
    low, high = wilson(alarms, splits)
    return {"splits": splits, "tonight_images": -(-len(profiles) // parts),
            "false_alarms": alarms, "rate": round(alarms / splits, 4),
            "rate_95ci": [round(low, 4), round(high, 4)], "by_measure": dict(by_measure)}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    parser.add_argument("--model", help="REG/NAME[/VERSION] or a bundle dir (default: the "
                                        "tests' tiny 2-class bundle)")
    parser.add_argument("--splits", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    defaults = HealthOptions()
    thresholds = DriftThresholds(defaults.drift_psi, defaults.drift_js, defaults.drift_p)
    with tempfile.TemporaryDirectory(prefix="lensflow-health-") as tmp:
        model = args.model
        if model is None:
            from tiny_image_bundle import make_image_bundle

            model = make_image_bundle(Path(tmp) / "registry", classes=("ants", "bees"))
        profiles = per_image_profiles(args.folder, model)
    figures = {"images": len(profiles), "thresholds": thresholds.__dict__,
               "halves": false_alarms(profiles, 2, args.splits, thresholds),
               f"trailing_{defaults.drift_runs}": false_alarms(
                   profiles, defaults.drift_runs + 1, args.splits, thresholds)}
    for mode in ("halves", f"trailing_{defaults.drift_runs}"):
        f = figures[mode]
        print(f"{mode:12s} {f['false_alarms']:4d} of {f['splits']} splits flagged "
              f"({f['rate']:.2%}, 95% CI {f['rate_95ci'][0]:.2%}-{f['rate_95ci'][1]:.2%}; "
              f"{f['tonight_images']} images tonight) by {f['by_measure'] or 'nothing'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
