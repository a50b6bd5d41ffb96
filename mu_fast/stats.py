"""Statistics over seeds: ``mean_std`` (the tables' mean ± std), Student-t intervals of a mean and of paired
differences, and Holm's correction.

A comparison of two methods on the organism is paired when both ran on the same seeds: the same data order, the
same relearning draws and probe initialisations, the same random corruptions. The difference per seed then removes
what the seed does to both, and ``paired_differences`` gives its mean with a t interval over the seeds (n − 1
degrees of freedom). With many comparisons some 95% intervals exclude 0 by chance; ``holm`` says which survive
Holm's step-down correction at the same family-wise level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= q) = ``confidence`` with ``dof`` degrees of freedom."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if dof < 1:
        raise ValueError(f"a t interval needs at least 2 values (1 degree of freedom); got {dof} degrees")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, dof))


def t_pvalue(statistic: float, dof: int) -> float:
    """Two-sided p-value of a t statistic with ``dof`` degrees of freedom."""
    from scipy.stats import t

    if math.isinf(statistic):
        return 0.0
    return float(2.0 * t.sf(abs(statistic), dof))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t interval over ``n`` values (``lo`` = ``hi`` = mean when n < 2: no interval)."""

    mean: float
    lo: float
    hi: float
    n: int
    p_value: float | None = None  # of "mean = 0" (paired differences); None for a plain mean or n < 2

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0.0 or self.hi < 0.0)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "p_value": self.p_value}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with its t interval (sample std, n − 1 degrees of freedom)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return Interval(mean, mean, mean, n)
    se = statistics.stdev(values) / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * se
    p = t_pvalue(mean / se if se > 0 else (math.inf if mean else 0.0), n - 1) if se > 0 or mean else 1.0
    return Interval(mean, mean - half, mean + half, n, p)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Interval:
    """``a[s] - b[s]`` over the seeds both have, as a mean with its t interval (and the p-value of no difference)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_differences needs seeds that both methods ran; they share none")
    return t_interval([a[s] - b[s] for s in seeds], confidence)


def holm(p_values: Mapping[str, float], level: float = 0.05) -> dict[str, bool]:
    """Holm's step-down test: ``{name: rejected}`` at family-wise error ``level`` over all ``p_values``."""
    ordered = sorted(p_values.items(), key=lambda kv: kv[1])
    m = len(ordered)
    out = {name: False for name in p_values}
    for k, (name, p) in enumerate(ordered):
        if p > level / (m - k):
            break
        out[name] = True
    return out
