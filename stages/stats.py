"""Statistics and decision rules over per-technique numbers: paired bootstrap differences (score),
headline rows, the latency/quality Pareto front and the report's recommendation rules (report).

Everything here is a pure function over plain lists and dicts, so the rules are unit-tested directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Row = dict[str, Any]

# perf.json / score.json keys copied as-is into a headline row (units are already in the names)
PERF_KEYS = ("device", "samples", "weight_mb", "latency_s_mean", "latency_s_p50", "latency_s_p90", "latency_s_p99",
             "ttft_s_p50", "tpot_s_p50", "samples_per_s", "tokens_per_s", "new_tokens_mean", "load_s",
             "acceptance_rate", "compile_s", "sparsity_overall", "draft_weight_mb", "weight_format", "tp_size", "quality",
             "achieved_bandwidth_gbs", "bandwidth_share", "peak_bandwidth_gbs", "peak_bandwidth_source", "bytes_per_step_mb",
             "energy_j_per_headline", "energy_j_per_token", "energy_source", "recompiles_in_timed_run", "compile_mode",
             "sparse_kernels", "device_used_mb", "memory_note", "speculative_used")
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_low", "rougeL_high", "rougeL_delta", "rougeL_delta_low",
              "rougeL_delta_high", "fidelity", "identical", "compared", "fidelity_reference", "first_difference", "baseline_identical")


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


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clean(data: Any) -> Any:
    """NaN/inf -> None, recursively, so the JSON we write is valid JSON for DVC and browsers."""
    if isinstance(data, dict):
        return {k: clean(v) for k, v in data.items()}
    if isinstance(data, list):
        return [clean(v) for v in data]
    return data if not isinstance(data, float) or math.isfinite(data) else None


def headline(name: str, perf: dict[str, Any], score: dict[str, Any]) -> Row:
    """One flat row of a technique's headline numbers, or {technique, skipped} when it did not run.

    Peak memory is the CUDA allocator's max_allocated on GPU and the process's peak RSS on CPU;
    `memory_measure` says which, since the two are not comparable.
    """
    cfg = perf.get("config") or {}
    row: Row = {"technique": name, "multi_gpu": bool(cfg.get("parallel") or cfg.get("device_map")),
                "reference": cfg.get("reference")}
    if perf.get("failed") or score.get("failed"):  # raised while running: shown like a skip, labelled a failure
        reason = perf.get("failed") or score.get("failed")
        return row | {"skipped": f"FAILED: {reason}", "failed": reason}
    if perf.get("skipped") or score.get("skipped"):
        return row | {"skipped": perf.get("skipped") or score.get("skipped")}
    row |= {k: perf[k] for k in PERF_KEYS if k in perf} | {k: score[k] for k in SCORE_KEYS if k in score}
    gpu = perf.get("max_allocated_mb") is not None
    row["peak_memory_mb"] = perf.get("max_allocated_mb") if gpu else perf.get("peak_rss_mb")
    row["memory_measure"] = "GPU max_allocated" if gpu else "CPU peak RSS"
    return row


def verdict(row: Row) -> str | None:
    """'worse' / 'better' when the paired ROUGE-L difference CI excludes 0, 'same' when it spans 0."""
    lo, hi = row.get("rougeL_delta_low"), row.get("rougeL_delta_high")
    if row.get("skipped") or not (finite(lo) and finite(hi)):
        return None
    return "worse" if hi < 0 else "better" if lo > 0 else "same"


def pareto_front(rows: list[Row], x: str, y: str) -> list[str]:
    """Techniques no other technique beats on both axes (lower `x` and higher `y` are better), by `x`.

    A point is dominated when another has x <= and y >= with one of them strict. Rows lacking either
    number (skipped, unscored) are left out.
    """
    pts = [(r[x], r[y], r["technique"]) for r in rows if finite(r.get(x)) and finite(r.get(y))]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in pts)]
    return [name for _, _, name in sorted(front)]


def cdf_points(values: list[float]) -> list[tuple[float, float]]:
    """Empirical CDF as (value, share of values <= it), one point per sorted value."""
    v = sorted(float(x) for x in values if finite(x))
    return [(x, (i + 1) / len(v)) for i, x in enumerate(v)]


NOT_WORSE = "among techniques whose ROUGE-L is not significantly below baseline"
NOT_WORSE_DEF = "ROUGE-L not significantly below baseline: the upper end of the paired {:.0%} CI of ΔROUGE-L is >= 0"


def _pick(scenario: str, pool: list[Row], key: Callable[[Row], Any], rule: str, value: Callable[[Row], str], empty: str) -> Row:
    pool = [r for r in pool if key(r) is not None]
    if not pool:
        return {"scenario": scenario, "choice": None, "rule": rule, "value": empty}
    best = min(pool, key=key)
    return {"scenario": scenario, "choice": best["technique"], "rule": rule, "value": value(best)}


def _num(r: Row, k: str) -> float | None:
    return r[k] if finite(r.get(k)) else None


def recommend(rows: list[Row], balanced_within: float) -> list[Row]:
    """The seed's five scenarios, each chosen by the rule printed beside it.

    Skipped techniques are never chosen; neither is one whose ROUGE-L is significantly below baseline,
    nor one without a paired difference (not shown to be as good).

    Args:
        rows: headline() rows.
        balanced_within: the balanced pick's ROUGE-L tolerance (absolute) below the best eligible ROUGE-L.

    Returns:
        [{scenario, choice (technique or None), rule, value}], plus `note` where a pick is a close call.
    """
    ran = [r for r in rows if not r.get("skipped")]
    ok = [r for r in ran if verdict(r) in ("same", "better")]
    none_ok = "none: no technique ran here with ROUGE-L not significantly below baseline"
    measures = sorted({r["memory_measure"] for r in ok}) or ["peak memory"]
    recs = [
        _pick("low latency", ok, lambda r: _num(r, "latency_s_p50"), f"lowest P50 latency {NOT_WORSE}",
              lambda r: f"P50 {r['latency_s_p50']:.3f} s", none_ok),
        _pick("memory-constrained", ok, lambda r: _num(r, "peak_memory_mb"), f"lowest peak memory ({' / '.join(measures)}) {NOT_WORSE}",
              lambda r: f"{r['peak_memory_mb']:.0f} MB {r['memory_measure']}", none_ok),
    ]
    multi = [r for r in rows if r["multi_gpu"]]
    why = "; ".join(f"{r['technique']}: {r['skipped']}" for r in multi if r.get("skipped")) or "no technique sets parallel or device_map"
    recs.append(_pick("multi-GPU", [r for r in ok if r["multi_gpu"]], lambda r: -r["tokens_per_s"] if finite(r.get("tokens_per_s")) else None,
                      f"highest tokens/s {NOT_WORSE}, that set parallel/device_map and ran here",
                      lambda r: f"{r['tokens_per_s']:.1f} tokens/s", f"none ran on this machine: {why}"))
    quality = _pick("highest quality", ok, lambda r: (-r["rougeL"], r.get("latency_s_p50") or math.inf) if finite(r.get("rougeL")) else None,
                    f"highest ROUGE-L (ties broken by lower P50 latency) {NOT_WORSE}", lambda r: f"ROUGE-L {r['rougeL']:.4f}", none_ok)
    top = next((r for r in ok if r["technique"] == quality["choice"]), None)
    others = sorted((r for r in ok if r is not top and finite(r.get("rougeL"))), key=lambda r: (-r["rougeL"], r.get("latency_s_p50") or math.inf))
    if top and others:
        nxt = others[0]
        lo, hi = top.get("rougeL_low"), top.get("rougeL_high")
        if nxt["rougeL"] == top["rougeL"]:
            quality["note"] = f"tied with {nxt['technique']} on ROUGE-L; chosen for lower latency"
        elif finite(lo) and finite(hi) and lo <= nxt["rougeL"] <= hi:
            quality["note"] = f"not clearly better than {nxt['technique']} ({nxt['rougeL']:.4f} lies inside its 95% CI [{lo:.4f}, {hi:.4f}])"
    recs.append(quality)
    best = max((r["rougeL"] for r in ok if finite(r.get("rougeL"))), default=None)
    near = [r for r in ok if best is not None and finite(r.get("rougeL")) and r["rougeL"] >= best - balanced_within]
    recs.append(_pick("balanced", near, lambda r: _num(r, "latency_s_p50"),
                      f"lowest P50 latency {NOT_WORSE}, and within {balanced_within} ROUGE-L of the best of them"
                      + (f" ({best:.4f})" if best is not None else ""),
                      lambda r: f"P50 {r['latency_s_p50']:.3f} s, ROUGE-L {r['rougeL']:.4f}", none_ok))
    return recs
