"""A run's profile: counts and fixed-bin histograms that merge exactly across shards.

Every measure is an integer count in a bin whose edges are fixed in advance (never learnt from the
data), so the profile of a run is the sum of its shards' profiles whatever the shard count, the
order the shards finished in or the machine they ran on: a Dask run's profile equals an
in-process run's bit for bit. Means and standard deviations come from fixed-point integer sums
(``Moments``), exact for the same reason. Profiles are plain frozen dataclasses of ints, strings
and tuples: picklable (Dask), and ``to_dict`` / ``from_dict`` round-trip through JSON (run
records).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

CATEGORICAL = "categorical"


def _powers_of_two(lo: int, hi: int, per_octave: int) -> tuple[float, ...]:
    return tuple(2.0 ** (k / per_octave) for k in range(lo * per_octave, hi * per_octave + 1))


_POSITIVE = _powers_of_two(-8, 16, 2)
#: Bin edges of each histogram scheme; a value below the first edge falls in the first bin, one
#: at or above the last in the last but one, a NaN in the last ("nan").
SCHEMES: dict[str, tuple[float, ...]] = {
    "unit": tuple(i / 20 for i in range(21)),           # probabilities, 0.05 wide
    "brightness": tuple(float(v) for v in range(0, 257, 16)),  # mean of 0..255, 16 bins
    "megapixels": _powers_of_two(-14, 7, 2),           # 61 pixels .. 128 MP, half octaves
    "kib": _powers_of_two(-2, 16, 2),                   # 256 bytes .. 64 MiB, half octaves
    # Unbounded values (regression outputs, recommender scores): sign and half octaves.
    "signed_log": tuple(-v for v in reversed(_POSITIVE)) + (0.0,) + _POSITIVE,
}
#: Fixed-point scale of Moments: values are summed as integers of 2⁻¹⁶.
MOMENT_SCALE = 1 << 16
_MOMENT_LIMIT = float(1 << 46)


def bin_labels(scheme: str) -> tuple[str, ...]:
    """Readable names of a histogram scheme's bins, in order."""
    edges = SCHEMES[scheme]
    inner = [f"[{_short(a)}, {_short(b)})" for a, b in zip(edges, edges[1:], strict=False)]
    return (f"< {_short(edges[0])}", *inner, f">= {_short(edges[-1])}", "nan")


def _short(value: float) -> str:
    return f"{value:.3g}"


def bin_counts(scheme: str, values: np.ndarray) -> np.ndarray:
    """int64 counts of ``values`` in each bin of ``scheme`` (see :data:`SCHEMES`)."""
    edges = np.asarray(SCHEMES[scheme])
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    nan = np.isnan(values)
    where = np.searchsorted(edges, values[~nan], side="right")
    counts = np.bincount(where, minlength=len(edges) + 1).astype(np.int64)
    return np.append(counts, np.int64(nan.sum()))


@dataclass(frozen=True)
class Distribution:
    """Counts per bin of one measure: a fixed-bin histogram (``scheme`` names its edges) or
    counts per category (``scheme`` is ``"categorical"``, ``bins`` the category names, sorted)."""

    name: str
    scheme: str
    counts: tuple[int, ...]
    bins: tuple[str, ...] = ()

    @classmethod
    def histogram(cls, name: str, scheme: str, counts: Iterable[int]) -> Distribution:
        return cls(name, scheme, tuple(int(c) for c in counts))

    @classmethod
    def categorical(cls, name: str, counts: Mapping[str, int]) -> Distribution:
        kept = sorted((str(k), int(v)) for k, v in counts.items() if v)
        return cls(name, CATEGORICAL, tuple(v for _, v in kept), tuple(k for k, _ in kept))

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bins if self.scheme == CATEGORICAL else bin_labels(self.scheme)

    def as_mapping(self) -> dict[str, int]:
        return dict(zip(self.labels, self.counts, strict=True))

    def merged(self, other: Distribution) -> Distribution:
        if (self.name, self.scheme) != (other.name, other.scheme):
            raise ValueError(f"cannot merge {self.name}/{self.scheme} with "
                             f"{other.name}/{other.scheme}")
        if self.scheme != CATEGORICAL:
            return Distribution(self.name, self.scheme,
                                tuple(a + b for a, b in zip(self.counts, other.counts,
                                                            strict=True)))
        both = self.as_mapping()
        for label, count in other.as_mapping().items():
            both[label] = both.get(label, 0) + count
        return Distribution.categorical(self.name, both)


@dataclass(frozen=True)
class Moments:
    """Count, mean and standard deviation of one measure, from exact integer sums."""

    name: str
    count: int = 0
    sum_q: int = 0
    sumsq_q: int = 0

    @classmethod
    def of(cls, name: str, values: np.ndarray) -> Moments:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        q = np.rint(np.clip(values, -_MOMENT_LIMIT, _MOMENT_LIMIT) * MOMENT_SCALE)
        ints = [int(v) for v in q.astype(np.int64).tolist()]
        return cls(name, len(ints), sum(ints), sum(v * v for v in ints))

    @property
    def mean(self) -> float:
        return self.sum_q / self.count / MOMENT_SCALE if self.count else math.nan

    @property
    def std(self) -> float:
        if not self.count:
            return math.nan
        variance = (self.sumsq_q * self.count - self.sum_q ** 2) / self.count ** 2
        return math.sqrt(max(variance, 0)) / MOMENT_SCALE

    def merged(self, other: Moments) -> Moments:
        return Moments(self.name, self.count + other.count, self.sum_q + other.sum_q,
                       self.sumsq_q + other.sumsq_q)


@dataclass(frozen=True)
class RunProfile:
    """Every measure of a run (or of a shard): distributions, moments, and per-run constants
    (such as a recommender's catalogue size) that every shard reports alike."""

    distributions: tuple[Distribution, ...] = ()
    moments: tuple[Moments, ...] = ()
    constants: tuple[tuple[str, int], ...] = field(default=())

    def distribution(self, name: str) -> Distribution | None:
        return next((d for d in self.distributions if d.name == name), None)

    def moment(self, name: str) -> Moments | None:
        return next((m for m in self.moments if m.name == name), None)

    def constant(self, name: str, default: int = 0) -> int:
        return dict(self.constants).get(name, default)

    def merged(self, other: RunProfile) -> RunProfile:
        constants = dict(self.constants)
        for name, value in other.constants:
            constants[name] = max(value, constants.get(name, value))
        return RunProfile(_merge_by_name(self.distributions, other.distributions),
                          _merge_by_name(self.moments, other.moments),
                          tuple(sorted(constants.items())))

    def to_dict(self) -> dict:
        return {"distributions": [{"name": d.name, "scheme": d.scheme, "counts": list(d.counts),
                                   **({"bins": list(d.bins)} if d.bins else {})}
                                  for d in self.distributions],
                "moments": [[m.name, m.count, m.sum_q, m.sumsq_q] for m in self.moments],
                "constants": dict(self.constants)}

    @classmethod
    def from_dict(cls, data: Mapping) -> RunProfile:
        return cls(
            tuple(Distribution(d["name"], d["scheme"], tuple(d["counts"]),
                               tuple(d.get("bins", ()))) for d in data.get("distributions", ())),
            tuple(Moments(*m) for m in data.get("moments", ())),
            tuple(sorted((k, int(v)) for k, v in (data.get("constants") or {}).items())))


def merge_profiles(profiles: Iterable[RunProfile | None]) -> RunProfile:
    """The sum of ``profiles`` (Nones left out): the same whatever their order."""
    total = RunProfile()
    for profile in profiles:
        if profile is not None:
            total = total.merged(profile)
    return total


def _merge_by_name(ours: tuple, theirs: tuple) -> tuple:
    by_name = {item.name: item for item in ours}
    for item in theirs:
        by_name[item.name] = by_name[item.name].merged(item) if item.name in by_name else item
    return tuple(by_name[name] for name in sorted(by_name))
