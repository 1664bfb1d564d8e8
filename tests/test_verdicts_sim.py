"""Simulation checks of the quality rule, calling the real code (stats.mean_interval, verdicts.decide / rows_to_decide):
vectorised numpy, a few seconds.

Data shaped like ours: per-row ΔROUGE-L of one-line headlines lies on a lattice (ROUGE-L F = 2 LCS / (len_a + len_b),
a few tokens each), is exactly 0 on most rows (identical headlines, or both scoring 0), and a technique that breaks a
few headlines (empty or garbled) adds rare large losses: a long left tail.

- Each tail of the interval misses the true mean at most 1.5 x (1 - level) / 2, at 95% and at the lossy family's
  simultaneous level, at score.min_rows rows and above; below min_rows there is no state ("too few rows").
  The paired t interval alone fails the lower tail with 3% failure rows even at 400 rows (at the family level its lower
  end lies above the truth 4.0x nominal with 90% identical rows, 2.0x with 70%; at 100 rows 13x and 4.6x), hence the
  skewness-corrected ends (stats.mean_interval: 1.1x and 1.3x at 400 rows) and min_rows = 400: at 100 rows 5% of runs
  see none of the 3% failure rows, and no interval from the rows can cover then (mean_interval misses 10.6x there).
  Known limit: rarer failures (1% of rows, 70% identical) still miss ~1.5-1.6x nominal at 400 rows.
- "worse" means beyond the margin: a true difference inside the margin is called worse no more often than one tail allows.
- Power: at the rows rows_to_decide() says are needed, the named state is reached in >= 80% of runs (less two Monte
  Carlo standard errors, POWER_SLACK: the rows are planned for exactly 80%, so the simulated share sits at 0.80-0.81).
- Family-wise error: with k techniques exactly at -margin, the chance that any is called non-inferior stays <= 5%.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from headline_bench.analysis.stats import mean_interval, paired_t
from headline_bench.analysis.verdicts import decide, rows_to_decide, simultaneous_level
from headline_bench.settings import load_params

SCORE = load_params().score
LEVELS = [0.95, simultaneous_level(SCORE.confidence, len(SCORE.family))]
LCS = np.cumsum([0.65, 0.22, 0.09])  # P(LCS <= 0, 1, 2 tokens) with the reference; 3 otherwise (mean ROUGE-L ~0.07, as measured)
FAIL_LEN = np.arange(18, 23)  # a failure row loses 4 of ~20 tokens' F: ~0.4, on the lattice 2k / L
FAIL = float(np.mean(-np.round(0.4 * FAIL_LEN / 2) * 2 / FAIL_LEN))
Draw = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]


def lattice_rouge(identical: float, failures: float) -> tuple[Draw, float]:
    """(draw, exact true mean) of per-row ΔROUGE-L: 0 on `identical` rows, else the difference of two independent
    lattice F-measures with the same reference; a share `failures` of rows instead loses ~0.4 (a broken headline)."""
    def draw(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        ref = rng.integers(6, 15, shape)
        a = 2 * np.searchsorted(LCS, rng.random(shape)) / (ref + rng.integers(6, 15, shape))
        b = 2 * np.searchsorted(LCS, rng.random(shape)) / (ref + rng.integers(6, 15, shape))
        d = np.where(rng.random(shape) < identical, 0.0, b - a)
        length = rng.integers(FAIL_LEN[0], FAIL_LEN[-1] + 1, shape)
        return np.where(rng.random(shape) < failures, -np.round(0.4 * length / 2) * 2 / length, d)
    return draw, failures * FAIL  # a and b are exchangeable, so the non-failure part has mean exactly 0


SHAPES = {
    "lattice, 30% identical": lattice_rouge(0.3, 0.0),
    "lattice, 90% identical": lattice_rouge(0.9, 0.0),
    "lattice, 30% identical, 3% failure rows": lattice_rouge(0.3, 0.03),
    "lattice, 70% identical, 3% failure rows": lattice_rouge(0.7, 0.03),
    "lattice, 90% identical, 3% failure rows": lattice_rouge(0.9, 0.03),
}
SIMS = 20_000
RUNS = 5_000  # power simulations
POWER_SLACK = 2 * (0.8 * 0.2 / RUNS) ** 0.5


def tail_misses(low: np.ndarray, high: np.ndarray, mu: float, level: float) -> tuple[float, float]:
    """(lower-end misses, upper-end misses) as multiples of one tail's nominal share (1 - level) / 2."""
    tail = (1 - level) / 2
    return float((low > mu).mean()) / tail, float((high < mu).mean()) / tail


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_tail_misses_at_most_1_5x_nominal_from_min_rows_on(name: str) -> None:
    draw, mu = SHAPES[name]
    rng = np.random.default_rng(20240501)
    for n in (30, 100, 400):
        if n < SCORE.min_rows:
            assert decide(-0.001, 0.001, SCORE.margin, n, SCORE.min_rows)[0] == "too few rows"
            continue
        x = draw(rng, (SIMS, n))
        for level in LEVELS:
            t = mean_interval(x, level)
            lo, hi = tail_misses(t["low"], t["high"], mu, level)
            assert lo <= 1.5 and hi <= 1.5, f"{name}, n={n}, level {level:.4f}: lower end misses {lo:.2f}x, upper {hi:.2f}x nominal"


def test_the_t_interval_alone_fails_the_lower_tail_with_failure_rows() -> None:
    """Why mean_interval is not paired_t: with a few broken headlines the t interval's lower end lies above the truth too often."""
    draw, mu = SHAPES["lattice, 90% identical, 3% failure rows"]
    x = draw(np.random.default_rng(20240501), (SIMS, 400))
    level = LEVELS[-1]
    t = paired_t(x, level)
    assert tail_misses(t["low"], t["high"], mu, level)[0] > 2.5
    fixed = mean_interval(x, level)
    assert tail_misses(fixed["low"], fixed["high"], mu, level)[0] <= 1.5


def states(x: np.ndarray, level: float) -> np.ndarray:
    t = mean_interval(x, level)
    return np.array([decide(lo, hi, SCORE.margin, x.shape[1], SCORE.min_rows)[0] for lo, hi in zip(t["low"], t["high"])])


def test_worse_means_beyond_the_margin() -> None:
    """A true difference of -0.008 (inside the 0.01 margin) was called worse in 95% of runs at 1,550 rows under the old rule
    (upper end below 0); now at most one tail's share, and it is noted significantly below instead."""
    level, n, runs = LEVELS[-1], 1_550, 4_000
    x = np.random.default_rng(3).normal(-0.8 * SCORE.margin, 0.08, (runs, n))
    got = states(x, level)
    assert (got == "worse").mean() <= 1.5 * (1 - level) / 2
    t = mean_interval(x, level)
    notes = [decide(lo, hi, SCORE.margin, n, SCORE.min_rows)[1] for lo, hi in zip(t["low"], t["high"])]
    assert sum(v == "significantly below the reference, not beyond the margin" for v in notes) > runs / 2


@pytest.mark.parametrize(("true_delta", "want"), [(0.0, "non-inferior"), (-0.005, "non-inferior"), (-0.03, "worse")])
@pytest.mark.parametrize("k", [1, len(SCORE.family)])
def test_the_state_rows_to_decide_names_is_reached_in_80_percent_at_those_rows(true_delta: float, want: str, k: int) -> None:
    sd, level = 0.06, simultaneous_level(SCORE.confidence, k)
    n, state = rows_to_decide(true_delta, sd, SCORE.margin, level, SCORE.power, SCORE.min_rows)
    assert state == want
    x = np.random.default_rng(11).normal(true_delta, sd, (RUNS, n))
    assert (states(x, level) == want).mean() >= SCORE.power - POWER_SLACK


def test_realistic_zero_difference_reaches_80_percent_power_too() -> None:
    draw, mu = SHAPES["lattice, 30% identical"]
    sd = float(draw(np.random.default_rng(5), (1, 1_000_000)).std())
    level = LEVELS[-1]
    n, state = rows_to_decide(mu, sd, SCORE.margin, level, SCORE.power, SCORE.min_rows)
    assert state == "non-inferior"
    x = draw(np.random.default_rng(6), (RUNS, n))
    assert (states(x, level) == "non-inferior").mean() >= SCORE.power - POWER_SLACK


def test_family_wise_error_of_the_non_inferiority_claim_stays_at_5_percent() -> None:
    # k techniques each exactly at -margin (not non-inferior): any "non-inferior" is a false claim
    k, n, runs = len(SCORE.family), SCORE.min_rows, 2_000
    x = np.random.default_rng(3).normal(-SCORE.margin, 0.08, (runs * k, n))
    low = mean_interval(x, simultaneous_level(SCORE.confidence, k))["low"]
    assert (low > -SCORE.margin).reshape(runs, k).any(axis=1).mean() <= 1 - SCORE.confidence
