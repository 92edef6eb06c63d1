"""Drift of a run's distributions against a baseline: PSI, Jensen–Shannon, and sampling noise.

Per distribution (same bins on both sides):

- **PSI**, the population stability index Σ (p − q) ln(p / q), shares smoothed by half a count
  per bin so a bin empty on one side stays finite. 0.1 is the usual "some shift", 0.25 "a
  significant shift".
- **JS**, the Jensen–Shannon divergence in bits (0 same, 1 disjoint), unsmoothed.
- **p**, the chance that two samples of one population differ this much (Pearson's chi-square
  test of the 2 × bins table; Wilson–Hilferty's approximation of its tail). A few dozen images
  give PSIs of 0.5 from noise alone, so a distribution is flagged only when its shift is large
  (PSI or JS at or over its threshold) *and* beyond noise (p under its threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scoring.run_health.profile import CATEGORICAL, Distribution, RunProfile

#: Bins kept per distribution for reports (the largest on either side; histograms in order).
SHOWN_BINS = 12


@dataclass(frozen=True)
class DriftThresholds:
    """When a distribution counts as drifted: (PSI >= psi or JS >= js) and p < p_value."""

    psi: float = 0.25
    js: float = 0.05
    p_value: float = 1e-4


@dataclass(frozen=True)
class MeasureDrift:
    """One distribution of a run against its baseline, with the shares a report draws."""

    measure: str
    n: int
    baseline_n: int
    psi: float
    js: float
    p_value: float
    flagged: bool
    bins: tuple[str, ...]
    today: tuple[float, ...]
    baseline: tuple[float, ...]

    def line(self) -> str:
        """``measure PSI 3.1 JS 0.42 (bin a 97% vs 12%)``: the bin that moved most."""
        moved = max(range(len(self.bins)), key=lambda i: abs(self.today[i] - self.baseline[i]),
                    default=None)
        where = "" if moved is None else (f" ({self.bins[moved]} {self.today[moved]:.0%} vs "
                                          f"{self.baseline[moved]:.0%})")
        return f"{self.measure} PSI {self.psi:.2f} JS {self.js:.2f}{where}"


def aligned(today: Distribution, baseline: Distribution) -> tuple[list[str], np.ndarray,
                                                                  np.ndarray]:
    """(bin labels, today's counts, the baseline's counts) over the same bins."""
    if today.scheme != CATEGORICAL:
        return list(today.labels), np.asarray(today.counts, np.float64), \
            np.asarray(baseline.counts, np.float64)
    ours, theirs = today.as_mapping(), baseline.as_mapping()
    labels = sorted(set(ours) | set(theirs))
    return labels, np.array([ours.get(k, 0) for k in labels], np.float64), \
        np.array([theirs.get(k, 0) for k in labels], np.float64)


def psi(a: np.ndarray, b: np.ndarray) -> float:
    """Population stability index of two count vectors over the bins either side uses."""
    used = (a + b) > 0
    a, b = a[used] + 0.5, b[used] + 0.5
    p, q = a / a.sum(), b / b.sum()
    return float(((p - q) * np.log(p / q)).sum())


def jensen_shannon(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen–Shannon divergence of two count vectors, in bits."""
    p, q = a / a.sum(), b / b.sum()
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return max(0.0, (kl(p) + kl(q)) / 2)


def chi_square_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of Pearson's chi-square test that two count vectors share one distribution.

    Bins where the smaller sample would expect fewer than 5 counts are pooled into one
    (Cochran's rule): the chi-square approximation overstates sparse bins' evidence, which made
    a few dozen images spread over many bins look drifted.
    """
    used = (a + b) > 0
    a, b = a[used], b[used]
    n, m = a.sum(), b.sum()
    share = min(n, m) / (n + m)
    sparse = (a + b) * share < 5
    if sparse.any():
        a, b = np.append(a[~sparse], a[sparse].sum()), np.append(b[~sparse], b[sparse].sum())
        if (a[-1] + b[-1]) * share < 5 and len(a) > 2:  # still sparse: into the smallest bin
            smallest = int(np.argmin(a[:-1] + b[:-1]))
            a[smallest] += a[-1]
            b[smallest] += b[-1]
            a, b = a[:-1], b[:-1]
    if len(a) < 2:
        return 1.0
    column = a + b
    ea, eb = column * n / (n + m), column * m / (n + m)
    statistic = float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum())
    return chi_square_tail(statistic, len(a) - 1)


def chi_square_tail(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), by Wilson–Hilferty's cube-root normal approximation."""
    if x <= 0:
        return 1.0
    h = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def drift_of(today: Distribution, baseline: Distribution,
             thresholds: DriftThresholds) -> MeasureDrift:
    """The drift of one distribution; not flagged when either side is empty."""
    labels, a, b = aligned(today, baseline)
    n, m = int(a.sum()), int(b.sum())
    if not n or not m:
        return MeasureDrift(today.name, n, m, math.nan, math.nan, math.nan, False, (), (), ())
    value_psi, value_js, p = psi(a, b), jensen_shannon(a, b), chi_square_p(a, b)
    flagged = (value_psi >= thresholds.psi or value_js >= thresholds.js) \
        and p < thresholds.p_value
    shown = _shown(a / n, b / m, ordered=today.scheme != CATEGORICAL)
    return MeasureDrift(today.name, n, m, round(value_psi, 6), round(value_js, 6), float(p),
                        flagged,
                        tuple(labels[i] for i in shown),
                        tuple(round(float(a[i]) / n, 6) for i in shown),
                        tuple(round(float(b[i]) / m, 6) for i in shown))


def _shown(p: np.ndarray, q: np.ndarray, *, ordered: bool) -> list[int]:
    """The bins worth drawing: the SHOWN_BINS largest on either side (histograms: their span)."""
    used = np.flatnonzero((p + q) > 0)
    if ordered:
        if len(used) <= SHOWN_BINS:
            return list(range(used.min(), used.max() + 1)) if len(used) else []
        largest = used[np.argsort(-np.maximum(p, q)[used], kind="stable")[:SHOWN_BINS]]
        return sorted(largest.tolist())
    order = used[np.argsort(-np.maximum(p, q)[used], kind="stable")]
    return order[:SHOWN_BINS].tolist()


def compare(profile: RunProfile, baseline: RunProfile,
            thresholds: DriftThresholds) -> tuple[MeasureDrift, ...]:
    """Every distribution of ``profile`` that the baseline also has, against it, by name."""
    return tuple(drift_of(d, other, thresholds) for d in profile.distributions
                 if (other := baseline.distribution(d.name)) is not None
                 and other.scheme == d.scheme)
