"""Bootstrap intervals, paired tests and ratios: pure functions over plain lists."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def bootstrap_means(columns: Any, n_samples: int, seed: int) -> np.ndarray:
    """Means of each column over the same resampled rows, n_samples times (vectorised, chunked).

    Each resample draws row counts from a multinomial, so one matrix product gives every column's mean
    and paired columns stay paired.

    Args:
        columns: [k, n] (or [n]) values per row.
        n_samples: bootstrap resamples.
        seed: for the generator.

    Returns:
        [n_samples, k] resampled means.
    """
    x = np.atleast_2d(np.asarray(columns, dtype=float))  # [k, n]
    n = x.shape[1]
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // max(n, 1))
    out = []
    for start in range(0, n_samples, chunk):
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, n_samples - start))  # [c, n]
        out.append(counts @ x.T / n)  # [c, k]
    return np.concatenate(out)


def interval(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution."""
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(dist, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_bootstrap(a: list[float], b: list[float], n_samples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of (a - b) over the same rows, with a percentile bootstrap interval over rows.

    Resampling rows (not each list on its own) keeps the pairing, so the interval reflects how much the
    difference varies across rows rather than how much each score varies.

    Returns:
        (mean difference, lower bound, upper bound).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    return (float(d.mean()), *interval(bootstrap_means(d, n_samples, seed)[:, 0], confidence))


def paired_test(a: list[float], b: list[float], margin: float, n_samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Paired bootstrap of mean(a - b): interval, two p-values and the numbers a verdict needs.

    p_value is two-sided for "no difference" (2 x the smaller tail share of resampled means beyond 0);
    p_noninferior is one-sided for "a is worse than b by at least `margin`" (share of resampled means <= -margin).
    Both count the observed sample as one resample ((k + 1) / (N + 1)), so neither is ever 0. They agree
    with the interval: at level c, the interval's upper end is below 0 when p_value < 1 - c, and its lower
    end is above -margin when p_noninferior < (1 - c) / 2.

    Args:
        a, b: per-row scores on the same rows, in the same order.
        margin: absolute non-inferiority margin (> 0).
        n_samples, confidence, seed: bootstrap resamples, interval level, generator seed.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = int(d.size)
    if n == 0:
        return {"delta": None, "low": None, "high": None, "p_value": None, "p_noninferior": None, "sd": None, "rows": 0}
    dist = bootstrap_means(d, n_samples, seed)[:, 0]
    lo, hi = interval(dist, confidence)

    def tail(k: Any) -> float:
        return (int(k) + 1) / (n_samples + 1)
    p = min(1.0, 2 * min(tail((dist <= 0).sum()), tail((dist >= 0).sum())))
    return {"delta": float(d.mean()), "low": lo, "high": hi, "p_value": p, "p_noninferior": tail((dist <= -margin).sum()),
            "sd": float(d.std(ddof=1)) if n > 1 else 0.0, "rows": n}


def paired_ratio(a: list[float], b: list[float], n_samples: int, confidence: float, seed: int,
                 a_tokens: list[float] | None = None, b_tokens: list[float] | None = None) -> tuple[float, float, float]:
    """Ratio of means mean(a) / mean(b) over the same rows with a paired bootstrap interval.

    With token counts, the ratio of times per token, (sum a / sum a_tokens) / (sum b / sum b_tokens), so a
    technique writing shorter outputs gains nothing from it.

    Returns:
        (ratio, lower bound, upper bound); NaNs when there are no rows.
    """
    if not len(a):
        return float("nan"), float("nan"), float("nan")
    cols = [a, b] if a_tokens is None or b_tokens is None else [a, a_tokens, b, b_tokens]
    point, dist = np.asarray(cols, dtype=float).mean(axis=1), bootstrap_means(cols, n_samples, seed)

    def ratio(m: np.ndarray) -> Any:
        return m[..., 0] / m[..., 1] if len(cols) == 2 else (m[..., 0] / m[..., 1]) / (m[..., 2] / m[..., 3])
    return (float(ratio(point)), *interval(ratio(dist), confidence))


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clean(data: Any) -> Any:
    """NaN/inf -> None, recursively, so the JSON we write is valid JSON for DVC and browsers."""
    if isinstance(data, dict):
        return {k: clean(v) for k, v in data.items()}
    if isinstance(data, list):
        return [clean(v) for v in data]
    return data if not isinstance(data, float) or math.isfinite(data) else None


def cdf_points(values: list[float]) -> list[tuple[float, float]]:
    """Empirical CDF as (value, share of values <= it), one point per sorted value."""
    v = sorted(float(x) for x in values if finite(x))
    return [(x, (i + 1) / len(v)) for i, x in enumerate(v)]
