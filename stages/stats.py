"""Statistics over per-row scores: paired bootstrap differences (more to come with the report)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a: list[float], b: list[float], n_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of (a - b) over the same rows, with a percentile bootstrap interval over rows.

    Resampling rows (not each list on its own) keeps the pairing, so the interval reflects how much the
    difference varies across rows rather than how much each score varies.

    Returns:
        (mean difference, lower bound, upper bound).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_samples, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)
