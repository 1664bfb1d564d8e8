"""Latency comparisons over timed processes, then rows, with an equivalence test for "tied".

Input contract (perf.json + generation records): each record keeps `latency_s_passes`, its latency in every timed
pass, and `new_tokens`; perf.json's `passes` list says, per pass, which timed process ran it (`process`; passes
without it all belong to one process). A process's per-row latency is its passes' mean.

Rule (README "Latency"): the ratio of seconds per generated token, technique / reference, has an interval over
processes and rows: the log ratio per process (paired by process index when both sides ran the same number of
processes, as an interleaving runner does; else unpaired) gives the run-to-run part, a row bootstrap of the
process-averaged ratio gives the prompt part; their variances add and the t quantile has (processes - 1) degrees
of freedom. **tied** only when that interval lies within [1 - tie, 1 + tie] (an equivalence test); else **faster** /
**slower** when it excludes 1; else **unresolved**. With fewer than 3 processes on either side there is no
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
    if len(lm) == len(lr):
        d = lm - lr
        se_proc2, df, paired = float(d.var(ddof=1)) / len(d), len(d) - 1, "paired by process"
    else:
        se_proc2, df, paired = float(lm.var(ddof=1)) / len(lm) + float(lr.var(ddof=1)) / len(lr), min(len(lm), len(lr)) - 1, "unpaired"
    se_rows2 = float(np.log(boot).std(ddof=1)) ** 2
    half = t_quantile(1 - (1 - confidence) / 2, df) * math.sqrt(se_proc2 + se_rows2)
    lo, hi = point * math.exp(-half), point * math.exp(half)
    return out | {"low": lo, "high": hi, "verdict": speed_verdict(lo, hi, tie),
                  "basis": f"{min(len(mine), len(ref))} processes ({paired}) and {len(ids)} rows"}


def speed_verdict(low: float, high: float, tie: float) -> str:
    """tied / faster / slower / unresolved from a ratio interval (technique time / reference time)."""
    if 1 - tie <= low and high <= 1 + tie:
        return "tied"
    if high < 1:
        return "faster"
    if low > 1:
        return "slower"
    return "unresolved"
