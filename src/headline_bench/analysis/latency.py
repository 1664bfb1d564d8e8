"""Latency comparisons over timed processes, then rows, with an equivalence test for "tied".

Input contract (perf.json + generation records): each record keeps `latency_s_passes`, its latency in every timed
pass, and `new_tokens`; perf.json's `passes` list says, per pass, which timed process ran it (`process`; passes
without it all belong to one process). A process's per-row latency is its passes' mean.

Rule (docs/methods.md "Timing"): the ratio of seconds per generated token, technique / reference, has an interval over
processes and rows: the log ratio per process (paired by process index when both sides ran the same number of
processes, as an interleaving runner does; else unpaired) gives the run-to-run part, a row bootstrap of the
process-averaged ratio gives the prompt part; their variances add and the t quantile has Welch-Satterthwaite degrees
of freedom over the parts (each side's processes when unpaired, the paired differences, the rows), so unequal
variances are not pooled. **tied** only when the interval at 1 - 2 (1 - confidence) (90% for a 95% report: two
one-sided tests at 5% each, TOST) lies within [1 - tie, 1 + tie]; else **faster** / **slower** when the interval at
`confidence` excludes 1; else **unresolved**. With fewer than 3 processes on either side there is no
run-to-run estimate: the verdict is n/a and only the rows-only interval is shown, labelled so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from headline_bench.analysis.stats import bootstrap_means, finite, interval, t_quantile

MIN_PROCESSES = 3


def process_rows(perf: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, tuple[float, float]]]:
    """Per timed process: {row id: (mean latency over its passes, new tokens)} over rows with a prediction."""
    passes = perf.get("passes") or [{}]
    owner = [p.get("process", 0) if isinstance(p, dict) else 0 for p in passes]
    out: dict[Any, dict[str, tuple[float, float]]] = defaultdict(dict)
    for g in records:
        if g.get("prediction") is None or not finite(g.get("latency_s")) or not finite(g.get("new_tokens")):
            continue
        if g.get("latency_s_processes"):  # fresh timed processes (generate.processes): each one's mean over its passes
            for k, v in enumerate(g["latency_s_processes"]):
                out[k][g["id"]] = (v, g["new_tokens"])
            continue
        lats = g.get("latency_s_passes") or [g["latency_s"]]
        by: dict[Any, list[float]] = defaultdict(list)
        for i, v in enumerate(lats):
            by[owner[i] if i < len(owner) else 0].append(v)
        for proc, vs in by.items():
            out[proc][g["id"]] = (sum(vs) / len(vs), g["new_tokens"])
    return [out[k] for k in sorted(out, key=str)]


def distinct_prompts(records: list[dict[str, Any]]) -> int:
    """Distinct prompts behind a technique's latency samples (percentiles over passes repeat the same prompts)."""
    return len({g["id"] for g in records if g.get("prediction") is not None and finite(g.get("latency_s"))})


def _per_token(proc: dict[str, tuple[float, float]], ids: list[str]) -> float:
    return sum(proc[i][0] for i in ids) / max(sum(proc[i][1] for i in ids), 1)


def speed_ratio(mine: list[dict[str, tuple[float, float]]], ref: list[dict[str, tuple[float, float]]], confidence: float, n_samples: int,
                seed: int, tie: float) -> dict[str, Any] | None:
    """Ratio of seconds per generated token (technique / reference) with its interval and verdict (module docstring)."""
    ids = [i for i in (mine[0] if mine else {}) if all(i in p for p in mine) and all(i in p for p in ref)]
    if not ids:
        return None
    # rows part: process-averaged per-row latency and tokens, ratio of per-token times, bootstrap over rows
    avg = [[float(np.mean([p[i][0] for p in side])) for i in ids] for side in (mine, ref)]
    toks = [[side[0][i][1] for i in ids] for side in (mine, ref)]
    cols = [avg[0], toks[0], avg[1], toks[1]]
    dist = bootstrap_means(cols, n_samples, seed)
    boot = (dist[:, 0] / dist[:, 1]) / (dist[:, 2] / dist[:, 3])
    point = (sum(avg[0]) / sum(toks[0])) / (sum(avg[1]) / sum(toks[1]))
    rows_lo, rows_hi = interval(boot, confidence)
    out: dict[str, Any] = {"ratio": point, "rows": len(ids), "processes": min(len(mine), len(ref)), "rows_low": rows_lo, "rows_high": rows_hi}
    if min(len(mine), len(ref)) < MIN_PROCESSES:
        return out | {"low": None, "high": None, "verdict": f"n/a: fewer than {MIN_PROCESSES} processes",
                      "basis": "rows only (run-to-run variance not included)"}
    lm = np.log([_per_token(p, ids) for p in mine])
    lr = np.log([_per_token(p, ids) for p in ref])
    rows_part = (float(np.log(boot).std(ddof=1)) ** 2, len(ids) - 1)
    if len(lm) == len(lr):
        d = lm - lr
        parts, paired = [(float(d.var(ddof=1)) / len(d), len(d) - 1), rows_part], "paired by process"
    else:
        parts, paired = [(float(x.var(ddof=1)) / len(x), len(x) - 1) for x in (lm, lr)] + [rows_part], "unpaired"
    se, df = math.sqrt(sum(v for v, _ in parts)), satterthwaite(parts)

    def bounds(level: float) -> tuple[float, float]:
        half = t_quantile(1 - (1 - level) / 2, df) * se
        return point * math.exp(-half), point * math.exp(half)
    (lo, hi), (tie_lo, tie_hi) = bounds(confidence), bounds(tie_level(confidence))
    return out | {"low": lo, "high": hi, "tie_low": tie_lo, "tie_high": tie_hi, "tie_level": tie_level(confidence), "df": df,
                  "verdict": speed_verdict(lo, hi, tie, tie_lo, tie_hi), "basis": f"{min(len(mine), len(ref))} processes ({paired}) and {len(ids)} rows"}


def tie_level(confidence: float) -> float:
    """Two-sided level whose interval lying within the tie bounds is a TOST at 1 - confidence (0.95 -> 0.90)."""
    return 1 - 2 * (1 - confidence)


def satterthwaite(parts: list[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance estimates, each (variance, its degrees of freedom).

    A part with 0 degrees of freedom (one row) adds nothing; all-zero variances give a very large df (the normal limit).
    """
    total = sum(v for v, _ in parts)
    denom = sum(v * v / df for v, df in parts if df > 0)
    return min(total * total / denom, 1e7) if denom > 0 else 1e7


def speed_verdict(low: float, high: float, tie: float, tie_low: float | None = None, tie_high: float | None = None) -> str:
    """tied / faster / slower / unresolved from a ratio interval (technique time / reference time).

    tied: the TOST interval (tie_low, tie_high; the interval itself where not given) lies within [1 - tie, 1 + tie];
    faster / slower: the interval at the report's confidence excludes 1.
    """
    lo_t, hi_t = (low, high) if tie_low is None or tie_high is None else (tie_low, tie_high)
    if 1 - tie <= lo_t and hi_t <= 1 + tie:
        return "tied"
    if high < 1:
        return "faster"
    if low > 1:
        return "slower"
    return "unresolved"
