"""Single numbers read off a profile: rates, shares, moments, histogram quantiles, coverage.

These are what a person reads first (the error rate went from 0.3 % to 40 %); the breaker decides
on the distributions (:mod:`scoring.run_health.drift`), which these summarise.
"""

from __future__ import annotations

import math

import numpy as np

from scoring.run_health.profile import SCHEMES, Distribution, RunProfile
from scoring.run_health.rec_profile import coverage, exposure_gini

QUANTILES = (0.05, 0.5, 0.95)


def share(distribution: Distribution | None, label: str) -> float | None:
    """Share of ``label`` in a categorical distribution (None without one)."""
    if distribution is None or not distribution.total:
        return None
    return distribution.as_mapping().get(label, 0) / distribution.total


def quantile(distribution: Distribution, q: float) -> float:
    """The ``q`` quantile of a fixed-bin histogram, linear inside its bin (an edge at the open
    ends; NaNs left out)."""
    edges = SCHEMES[distribution.scheme]
    counts = np.asarray(distribution.counts[:-1], np.float64)  # the last bin holds NaNs
    total = counts.sum()
    if not total:
        return math.nan
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, q * total, side="left"))
    if i == 0:
        return edges[0]
    if i > len(edges) - 1:
        return edges[-1]
    lo, hi = edges[i - 1], edges[i]
    inside = (q * total - cumulative[i - 1]) / counts[i] if counts[i] else 0.5
    return float(lo + (hi - lo) * min(max(inside, 0.0), 1.0))


def figures(profile: RunProfile) -> dict[str, float]:
    """Every single-number figure the profile supports, by name."""
    out: dict[str, float | None] = {}
    outcome = profile.distribution("rows.outcome")
    if outcome is not None and outcome.total:
        out["rows.error_rate"] = 1.0 - share(outcome, "scored")
    content = profile.distribution("inputs.content")
    out["inputs.near_constant_share"] = share(content, "near_constant")
    out["inputs.grayscale_share"] = share(content, "grayscale")
    for name in ("inputs.megapixels", "inputs.file_kib"):
        if (d := profile.distribution(name)) is not None and d.total:
            out[f"{name}.median"] = quantile(d, 0.5)
    for moment in profile.moments:
        out[f"{moment.name}.mean"] = moment.mean
        out[f"{moment.name}.std"] = moment.std
        if (d := profile.distribution(moment.name)) is not None:
            for q in QUANTILES:
                out[f"{moment.name}.p{round(q * 100):02d}"] = quantile(d, q)
    out["recommendations.coverage"] = coverage(profile)
    out["recommendations.exposure_gini"] = exposure_gini(profile)
    out["recommendations.users_skipped_share"] = share(
        profile.distribution("recommendations.users"), "unknown")
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}
