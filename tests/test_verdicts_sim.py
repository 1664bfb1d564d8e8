"""Simulation checks of the quality rule (analysis/verdicts.py) before trusting it: vectorised numpy, a few seconds.

- Coverage: the paired t interval covers the true mean ΔROUGE-L within 1.5 points of nominal at n = 12, 30 and 100,
  at 95% and at the simultaneous level of an 8-comparison family, on normal differences and on ΔROUGE-L-like ones
  (a share of rows with identical headlines, Δ = 0, the rest differences of two bounded scores, with and without a
  loss). Not covered: rows that are nearly all identical (>= 90%) at n <= 30, where every small-sample interval
  undercovers because most samples show no difference at all; that is one reason states need score.min_rows rows.
- Power: a technique with true Δ = 0 is non-inferior in at least 80% of simulated runs at the rows that
  rows_to_decide() says are needed (at the true sd), in a family of 1 and of 8.
- Family-wise error: with 8 techniques exactly at -margin, the chance that any is called non-inferior stays <= 5%.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from headline_bench.analysis.stats import t_quantile
from headline_bench.analysis.verdicts import rows_to_decide, simultaneous_level

SIMS = 20_000
Draw = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]


def rouge_like(identical: float, spread: float, shift: float) -> Draw:
    """Per-row ΔROUGE-L: Δ = 0 on a share of rows (identical headlines), else clip(a + noise) - a with a ~ Beta(2, 5)."""
    def draw(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        a = rng.beta(2, 5, shape)
        d = np.clip(a + rng.normal(shift, spread, shape), 0, 1) - a
        return np.where(rng.random(shape) < identical, 0.0, d)
    return draw


def true_mean(draw: Draw) -> float:
    return float(draw(np.random.default_rng(123), (1, 4_000_000)).mean())


def t_bounds(x: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The paired t interval of each simulated run (rows along axis 1), as verdicts.compare() computes it."""
    n = x.shape[1]
    half = t_quantile(1 - (1 - level) / 2, n - 1) * x.std(axis=1, ddof=1) / np.sqrt(n)
    m = x.mean(axis=1)
    return m - half, m + half


DISTRIBUTIONS = {
    "normal sd 0.1": lambda rng, shape: rng.normal(0.0, 0.1, shape),
    "30% identical, no loss": rouge_like(0.3, 0.2, 0.0),
    "30% identical, loss": rouge_like(0.3, 0.2, -0.02),
    "60% identical, loss": rouge_like(0.6, 0.15, -0.05),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("level", [0.95, simultaneous_level(0.95, 8)])
def test_paired_t_coverage_within_1_5_points_at_12_30_100(name: str, level: float) -> None:
    draw = DISTRIBUTIONS[name]
    mu = 0.0 if name.startswith("normal") else true_mean(draw)
    rng = np.random.default_rng(7)
    for n in (12, 30, 100):
        lo, hi = t_bounds(draw(rng, (SIMS, n)), level)
        coverage = float(((lo <= mu) & (mu <= hi)).mean())
        assert abs(coverage - level) <= 0.015, f"{name}, n={n}: coverage {coverage:.4f} vs nominal {level:.4f}"


@pytest.mark.parametrize("k", [1, 8])
def test_true_zero_difference_is_non_inferior_in_80_percent_at_the_rows_said_to_be_needed(k: int) -> None:
    margin, sd = 0.01, 0.05
    level = simultaneous_level(0.95, k)
    n, state = rows_to_decide(0.0, sd, margin, level, 0.8, 30)
    assert state == "non-inferior"
    rng = np.random.default_rng(11)
    runs = 4_000
    x = rng.normal(0.0, sd, (runs, n))
    lo, _ = t_bounds(x, level)
    assert float((lo > -margin).mean()) >= 0.8


def test_realistic_zero_difference_reaches_80_percent_power_too() -> None:
    draw = rouge_like(0.3, 0.05, 0.0)
    mu = true_mean(draw)
    sd = float(draw(np.random.default_rng(5), (1, 1_000_000)).std())
    level = simultaneous_level(0.95, 8)
    n, state = rows_to_decide(mu, sd, 0.01, level, 0.8, 30)
    assert state == "non-inferior"
    lo, _ = t_bounds(draw(np.random.default_rng(6), (4_000, n)), level)
    assert float((lo > -0.01).mean()) >= 0.8


def test_family_wise_error_of_the_non_inferiority_claim_stays_at_5_percent() -> None:
    # 8 techniques each exactly at -margin (not non-inferior): any "non-inferior" is a false claim
    margin, sd, n, k = 0.01, 0.08, 200, 8
    rng = np.random.default_rng(3)
    x = rng.normal(-margin, sd, (5_000 * k, n))
    lo, _ = t_bounds(x, simultaneous_level(0.95, k))
    any_false = (lo > -margin).reshape(5_000, k).any(axis=1).mean()
    assert any_false <= 0.05
