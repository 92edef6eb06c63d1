"""The profile of an image shard, gathered batch by batch while it scores (no second pass).

Inputs: file size and original megapixels (the image header, read from the bytes the decoder
reads anyway), mean brightness, and whether an image is colour, grayscale or near-constant,
from a 28 × 28 pixel sample of the decoded model input already in memory. Rows: scored, or the
error's cause (its exception class). Predictions, by task: the top-1 label and its confidence;
for multi-label also every label's positive count and the histogram of all probabilities; for
regression every output's histogram and moments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from scoring.run_health.profile import Distribution, Moments, RunProfile, bin_counts

#: Rows (and columns) of the pixel sample the input measures look at: 28 × 28 of lite0's
#: 224 px input (every 8th row and column), every pixel of a smaller one.
SAMPLE_SIDE = 28
#: An image whose sampled brightness varies less than this (std of 0..255) is near-constant:
#: a black, white or single-colour frame; photos sit far above (JPEG noise stays below ~1).
NEAR_CONSTANT_STD = 3.0
#: An image whose sampled channels differ by at most this on average (and never by more than
#: GRAY_MAX_SPREAD) is grayscale, JPEG's chroma noise allowed for.
GRAY_MEAN_SPREAD = 2.0
GRAY_MAX_SPREAD = 12


def pixel_sample(images) -> np.ndarray:
    """uint8 (n, ~28, ~28, 3) of a batch of decoded images (a numpy array or a torch tensor,
    on any device): what the input measures look at."""
    step = max(1, images.shape[1] // SAMPLE_SIDE)
    sample = images[:, ::step, ::step, :]
    if hasattr(sample, "cpu"):
        sample = sample.cpu().numpy()
    return np.asarray(sample)


def content_of(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean brightness per image, content per image: 0 colour, 1 grayscale, 2 near-constant)."""
    # Channel by channel, elementwise: numpy's reductions over a length-3 last axis are ~20x
    # slower than these (0.43 ms an image against 0.02 on lite0's 224 px input).
    r, g, b = (np.ascontiguousarray(sample[..., c]).reshape(len(sample), -1)
               .astype(np.float32) for c in range(3))
    brightness = (r + g + b) / 3
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    gray = (spread.mean(axis=1) <= GRAY_MEAN_SPREAD) & (spread.max(axis=1) <= GRAY_MAX_SPREAD)
    constant = brightness.std(axis=1) < NEAR_CONSTANT_STD
    return brightness.mean(axis=1), np.where(constant, 2, np.where(gray, 1, 0))


CONTENT = ("colour", "grayscale", "near_constant")


class ImageProfiler:
    """Accumulates one shard's profile; :meth:`profile` gives it as a :class:`RunProfile`."""

    def __init__(self, task: str, classes: Sequence[str],
                 thresholds: Sequence[float] | None = None) -> None:
        self.task = task
        self.classes = list(classes)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
        self.outcomes: Counter = Counter()
        self.histograms: dict[tuple[str, str], np.ndarray] = {}
        self.categories: dict[str, Counter] = {}
        self.moments: dict[str, Moments] = {}

    def add(self, sizes: Sequence[int], pixels: np.ndarray | None, sample: np.ndarray | None,
            failed: Sequence[tuple[int, str]], outputs: np.ndarray | None,
            values: Sequence | None = None) -> None:
        """One batch.

        sizes: file sizes in bytes of the decoded images; pixels: their original pixel counts
        (None where unknown, as on the GPU path); sample: :func:`pixel_sample` of them;
        failed: (index, error) of the rows that failed; outputs: the graph's scores of the
        decoded images; values: the written regression outputs per image (points in pixels).
        """
        self.outcomes["scored"] += len(sizes)
        self.outcomes.update(error.split(":", 1)[0] for _, error in failed)
        if not len(sizes):
            return
        self._histogram("inputs.file_kib", "kib", np.asarray(sizes, dtype=np.float64) / 1024)
        if pixels is not None:
            self._histogram("inputs.megapixels", "megapixels",
                            np.asarray(pixels, dtype=np.float64) / 1e6)
        if sample is not None:
            brightness, content = content_of(sample)
            self._histogram("inputs.brightness", "brightness", brightness)
            self._count("inputs.content", [CONTENT[c] for c in content.tolist()])
        if self.task == "regression":
            self._regression(np.asarray(values if values is not None else outputs,
                                        dtype=np.float64).reshape(len(sizes), -1))
        elif outputs is not None:
            self._classes(np.asarray(outputs, dtype=np.float32).reshape(len(sizes), -1))

    def _classes(self, scores: np.ndarray) -> None:
        best = scores.argmax(axis=1)
        self._count("predictions.top1_label", [self.classes[j] for j in best.tolist()])
        self._histogram("predictions.top1_confidence", "unit",
                        scores[np.arange(len(scores)), best])
        if self.task == "multi_label" and self.thresholds is not None:
            self._histogram("predictions.probability", "unit", scores)
            hits = (scores > self.thresholds).sum(axis=0).tolist()
            for name, positive in zip(self.classes, hits, strict=True):
                self.categories.setdefault(f"predictions.positive.{name}", Counter()).update(
                    {"positive": positive, "negative": len(scores) - positive})

    def _regression(self, values: np.ndarray) -> None:
        for j in range(values.shape[1]):
            name = f"predictions.output.{j}"
            self._histogram(name, "signed_log", values[:, j])
            moments = Moments.of(name, values[:, j])
            self.moments[name] = self.moments[name].merged(moments) if name in self.moments \
                else moments

    def _histogram(self, name: str, scheme: str, values: np.ndarray) -> None:
        counts = bin_counts(scheme, values)
        key = (name, scheme)
        self.histograms[key] = self.histograms[key] + counts if key in self.histograms else counts

    def _count(self, name: str, labels: Sequence[str]) -> None:
        self.categories.setdefault(name, Counter()).update(labels)

    def profile(self) -> RunProfile:
        distributions = [Distribution.categorical("rows.outcome", self.outcomes)]
        distributions += [Distribution.histogram(name, scheme, counts)
                          for (name, scheme), counts in self.histograms.items()]
        distributions += [Distribution.categorical(name, counts)
                          for name, counts in self.categories.items()]
        return RunProfile(tuple(sorted(distributions, key=lambda d: d.name)),
                          tuple(self.moments[name] for name in sorted(self.moments)))
