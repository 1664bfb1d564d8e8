"""Simulation checks of the fidelity intervals, calling the real code (stats.mean_interval for the row means, as
quality/divergence.summarize uses it; divergence.bootstrap_p99 for the 99th percentile): vectorised numpy, seconds.

Data shaped like ours: the measured per-position KL of the CPU lossy techniques (50 rows each, SmolLM2 on the bundled
rows) has a within-row coefficient of variation of 0.8-1.1 and a 99th-percentile-to-mean ratio of 4-8.5; per-row
means have a CV of 0.3-0.5 and a skewness of 1-1.8. Shapes: per-position KL = row scale (lognormal) x a gamma or
lognormal draw, 10-24 positions a row (as our headlines), and a shape where 4% of rows are 5x worse (a row the
technique derails on).

- Row means (kl_mean; top1 and nll_delta use the same interval): on the shapes like the measured ones, each tail of
  mean_interval misses the true mean at most 1.5 x (1 - level) / 2, at 95% and at the family's level (0.9975), from
  fidelity.min_rows (100) rows on. At 30-50 rows its upper end misses ~2x nominal at the family level (the reason min_rows
  is 100), and a percentile bootstrap (the former method) misses ~2x at 95% and 4-8x at the family level.
- Known limits, measured here and not asserted: on the heavier lognormal shape (row skewness ~1.8, as cpu_fast's
  measured rows) the upper end misses 1.5-1.9x nominal at the family level at 100 rows (~1.0-1.4x at 200); when 4% of
  rows are 5x worse, 2% of 100-row samples hold none of them and no interval from the rows can cover: ~11x at the family
  level at 100 rows, ~5x at 200. Rare rows a technique derails on need more rows than fidelity.rows to be seen.
- kl_p99: the whole-row percentile bootstrap's lower end is conservative (it may put a technique beyond its bound), its
  upper end misses several times nominal (so it never certifies "within": divergence.SCREENS).
"""

from __future__ import annotations

import numpy as np
import pytest

from headline_bench.analysis.stats import interval, mean_interval
from headline_bench.analysis.verdicts import simultaneous_level
from headline_bench.quality.divergence import NOT_BEYOND, bootstrap_p99, summarize
from headline_bench.settings import load_params

PARAMS = load_params()
FID, SCORE = PARAMS.fidelity, PARAMS.score
FAMILY_LEVEL = simultaneous_level(SCORE.confidence, len(SCORE.family) * len(FID.decide))
MAX_POS = 24
SIMS = 20_000

# (row-scale log-sd, per-position kind, its parameter, share of bad rows)
SHAPES = {
    "gamma 0.8, like quant8": (0.35, "gamma", 0.8, 0.0),
    "gamma 1.3, like quant4": (0.25, "gamma", 1.3, 0.0),
    "lognormal 1.0, heavier than measured": (0.3, "lognormal", 1.0, 0.0),
    "gamma 0.8, 4% of rows 5x worse": (0.35, "gamma", 0.8, 0.04),
}


def draw(rng: np.random.Generator, shape: tuple[float, str, float, float], sims: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-position KL [sims, n, MAX_POS], mask of the positions a row has); every position's expected KL is 1 x the row scale."""
    s_row, kind, par, bad = shape
    scale = np.exp(rng.normal(0, s_row, (sims, n, 1))) * np.where(rng.random((sims, n, 1)) < bad, 5.0, 1.0)
    if kind == "gamma":
        pos = rng.gamma(par, 1 / par, (sims, n, MAX_POS))
    else:
        pos = np.exp(rng.normal(-par**2 / 2, par, (sims, n, MAX_POS)))
    mask = np.arange(MAX_POS) < rng.integers(10, MAX_POS + 1, (sims, n, 1))
    return scale * pos, mask


def truth(shape: tuple[float, str, float, float]) -> tuple[float, float]:
    """(mean of per-row mean KL, 99th percentile of all positions) from 400,000 rows."""
    kl, mask = draw(np.random.default_rng(99), shape, 400, 1000)
    row_means = (kl * mask).sum(-1) / mask.sum(-1)
    return float(row_means.mean()), float(np.quantile(kl[mask], 0.99))


def misses(low: np.ndarray, high: np.ndarray, mu: float, level: float) -> tuple[float, float]:
    """(lower-end misses, upper-end misses) as multiples of one tail's nominal share."""
    tail = (1 - level) / 2
    return float(np.mean(low > mu)) / tail, float(np.mean(high < mu)) / tail


@pytest.mark.parametrize("name", ["gamma 0.8, like quant8", "gamma 1.3, like quant4"])
def test_row_mean_interval_tails_within_1_5x_from_min_rows_on(name: str) -> None:
    mu, _ = truth(SHAPES[name])
    rng = np.random.default_rng(20240501)
    for n in (FID.min_rows, 2 * FID.min_rows):  # 100, 200
        kl, mask = draw(rng, SHAPES[name], SIMS, n)
        row_means = (kl * mask).sum(-1) / mask.sum(-1)
        for level in (0.95, FAMILY_LEVEL):
            t = mean_interval(row_means, level)
            lo, hi = misses(t["low"], t["high"], mu, level)
            assert lo <= 1.5 and hi <= 1.5, f"{name}, n={n}, level {level:.4f}: lower end misses {lo:.2f}x, upper {hi:.2f}x nominal"


def test_why_min_rows_is_100_and_the_bootstrap_of_the_mean_was_replaced() -> None:
    shape = SHAPES["gamma 0.8, like quant8"]
    mu, _ = truth(shape)
    rng = np.random.default_rng(7)
    for n in (30, 50):  # fewer rows: the upper end is too low too often (~2x nominal at both)
        kl, mask = draw(rng, shape, SIMS, n)
        t = mean_interval((kl * mask).sum(-1) / mask.sum(-1), FAMILY_LEVEL)
        assert misses(t["low"], t["high"], mu, FAMILY_LEVEL)[1] > 1.5
    sims, n = 2_000, 50  # the percentile bootstrap of the row mean at 95%, 50 rows
    kl, mask = draw(rng, shape, sims, n)
    row_means = (kl * mask).sum(-1) / mask.sum(-1)
    boot = np.stack([m[rng.integers(0, n, (2_000, n))].mean(1) for m in row_means])
    lows, highs = np.quantile(boot, [0.025, 0.975], axis=1)
    assert misses(lows, highs, mu, 0.95)[1] > 1.5


def test_p99_bootstrap_is_a_screen_conservative_below_and_unreliable_above() -> None:
    """The real bootstrap_p99 at 50 rows, 95%: the lower end misses at most 1.5x nominal (so "beyond
    bound" from it is safe), the upper end more than 2x (so it must not certify "within bound")."""
    shape = SHAPES["gamma 0.8, like quant8"]
    _, p99 = truth(shape)
    rng = np.random.default_rng(3)
    sims, n = 1_000, 50
    kl, mask = draw(rng, shape, sims, n)
    ends = []
    for s in range(sims):
        rows = [{"kl": kl[s, i][mask[s, i]]} for i in range(n)]
        ends.append(interval(bootstrap_p99(rows, 1_000, s), 0.95))
    low, high = np.asarray(ends).T
    lo, hi = misses(low, high, p99, 0.95)
    assert lo <= 1.5 and hi > 2.0, f"lower end misses {lo:.2f}x, upper {hi:.2f}x nominal"


def test_summarize_never_calls_a_technique_within_on_the_p99_screen_alone() -> None:
    rng = np.random.default_rng(0)
    kl, mask = draw(rng, SHAPES["gamma 1.3, like quant4"], 1, FID.min_rows)
    rows = [{"kl": (0.001 * kl[0, i][mask[0, i]]).tolist(), "kl_mean": float(0.001 * kl[0, i][mask[0, i]].mean()), "top1": 0.99,
             "nll_delta": 0.0, "tail_mass": 0.0} for i in range(FID.min_rows)]
    bounds = FID.bounds.model_dump()
    assert summarize(rows, bounds, FAMILY_LEVEL, 500, 1, FID.min_rows, ["kl_p99"])["fidelity_state"] == "inconclusive"
    both = summarize(rows, bounds, FAMILY_LEVEL, 500, 1, FID.min_rows, ["kl_mean", "kl_p99"])
    assert both["kl_p99"]["state"] == NOT_BEYOND and both["fidelity_state"] == "within bound"
    assert summarize(rows[: FID.min_rows - 1], bounds, FAMILY_LEVEL, 500, 1, FID.min_rows, ["kl_mean"])["fidelity_state"] == "too few rows"
