"""Intervals over seeds (mu_fast.stats) against hand-computed values and a simulation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mu_fast.stats import Interval, holm, paired_differences, t_interval, t_quantile


def test_t_quantile_matches_tables():
    # Two-sided 95%: 12.706 (1 dof), 2.776 (4), 2.262 (9); 99% with 4 dof: 4.604.
    assert t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.95, 9) == pytest.approx(2.262, abs=1e-3)
    assert t_quantile(0.99, 4) == pytest.approx(4.604, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 values"):
        t_quantile(0.95, 0)


def test_t_interval_by_hand(rng):
    values = (torch.rand(5, generator=rng) * 0.5).tolist()
    iv = t_interval(values)
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(5)
    assert iv.mean == pytest.approx(mean) and iv.n == 5
    assert iv.lo == pytest.approx(mean - 2.7764451 * se) and iv.hi == pytest.approx(mean + 2.7764451 * se)
    assert t_interval([0.3]) == Interval(0.3, 0.3, 0.3, 1)


def test_paired_differences_use_shared_seeds_only():
    a = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}
    b = {0: 0.4, 1: 0.45, 2: 0.62}
    iv = paired_differences(a, b)
    assert iv.n == 3 and iv.mean == pytest.approx(statistics.fmean([0.1, 0.15, 0.08]))
    assert iv.excludes_zero and iv.p_value < 0.05
    with pytest.raises(ValueError, match="share none"):
        paired_differences({0: 1.0}, {1: 1.0})


def test_interval_coverage_is_about_95_percent():
    # Simulated: normal differences with mean 0.1; the 95% interval over 5 draws covers 0.1 about 95% of the time.
    gen = torch.Generator().manual_seed(0)
    draws = (0.1 + 0.2 * torch.randn(4000, 5, generator=gen, dtype=torch.float64)).tolist()
    covered = sum(t_interval(row).lo <= 0.1 <= t_interval(row).hi for row in draws) / len(draws)
    assert 0.93 <= covered <= 0.97


def test_holm_step_down():
    ps = {"a": 0.001, "b": 0.02, "c": 0.04, "d": 0.3}
    # m = 4: 0.001 <= 0.0125 rejects a; 0.02 > 0.05/3 stops.
    assert holm(ps) == {"a": True, "b": False, "c": False, "d": False}
    assert holm({"x": 0.01, "y": 0.02}) == {"x": True, "y": True}
