"""The profile of a recommender shard, gathered block by block while it scores.

Measures: the histogram of the scores written to the top-k (or, with no top-k, of every score),
how many top-k slots each item took (its exposure: catalogue coverage and the Gini coefficient of
exposure follow from it), and users scored vs skipped as unknown.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from scoring.run_health.profile import Distribution, RunProfile, bin_counts

CATALOGUE = "catalogue_items"


class RecProfiler:
    """Accumulates one user shard's profile; :meth:`profile` gives it."""

    def __init__(self, catalogue_items: int) -> None:
        self.catalogue_items = catalogue_items
        self.scores = bin_counts("signed_log", np.zeros(0))
        self.exposure: Counter = Counter()
        self.users = 0

    def add(self, users: int, topk: pa.RecordBatch | None, scores: np.ndarray | None) -> None:
        """One block of ``users``: its top-k rows, or (no top-k) its matrix of scores."""
        self.users += users
        if topk is not None:
            self.scores += bin_counts("signed_log", topk.column("score").to_numpy())
            items, counts = np.unique(topk.column("item_id").to_numpy(zero_copy_only=False),
                                      return_counts=True)
            self.exposure.update(dict(zip(map(str, items.tolist()), counts.tolist(),
                                          strict=True)))
        elif scores is not None:
            self.scores += bin_counts("signed_log", scores)

    def profile(self, unknown_users: int = 0) -> RunProfile:
        distributions = [
            Distribution.histogram("recommendations.score", "signed_log", self.scores),
            Distribution.categorical("recommendations.users",
                                     {"scored": self.users, "unknown": unknown_users}),
        ]
        if self.exposure:
            distributions.append(Distribution.categorical("recommendations.item_exposure",
                                                          self.exposure))
        return RunProfile(tuple(sorted(distributions, key=lambda d: d.name)),
                          constants=((CATALOGUE, self.catalogue_items),))


def coverage(profile: RunProfile) -> float | None:
    """Share of the catalogue that appears in at least one user's top-k."""
    exposure, items = profile.distribution("recommendations.item_exposure"), \
        profile.constant(CATALOGUE)
    if exposure is None or not items:
        return None
    return len(exposure.counts) / items


def exposure_gini(profile: RunProfile) -> float | None:
    """Gini coefficient of top-k slots per catalogue item (items never shown count as 0):
    0 every item equally often, near 1 every slot on one item."""
    exposure, items = profile.distribution("recommendations.item_exposure"), \
        profile.constant(CATALOGUE)
    if exposure is None or not items or not exposure.total:
        return None
    counts = np.sort(np.concatenate([np.asarray(exposure.counts, dtype=np.float64),
                                     np.zeros(max(0, items - len(exposure.counts)))]))
    n = len(counts)
    ranks = np.arange(1, n + 1)
    return float((2 * (ranks * counts).sum()) / (n * counts.sum()) - (n + 1) / n)
