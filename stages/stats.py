"""Statistics and decision rules over per-technique numbers: paired bootstrap differences (score),
headline rows, the latency/quality Pareto front and the report's recommendation rules (report).

Everything here is a pure function over plain lists and dicts, so the rules are unit-tested directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import numpy as np

Row = dict[str, Any]

# perf.json / score.json keys copied as-is into a headline row (units are already in the names)
PERF_KEYS = ("device", "samples", "weight_mb", "latency_s_mean", "latency_s_p50", "latency_s_p90", "latency_s_p99", "latency_s_max",
             "latency_count", "ttft_s_p50", "tpot_s_p50", "samples_per_s", "tokens_per_s", "new_tokens_mean", "load_s", "acceptance_rate",
             "compile_s", "sparsity_overall", "sparsity_all_params", "sparsity_layers", "draft_weight_mb", "weight_format", "tp_size",
             "repeats", "tokens_per_s_spread", "latency_s_mean_spread", "rss_reset", "dtype", "quality",
             "achieved_bandwidth_gbs", "bandwidth_share", "peak_bandwidth_gbs", "peak_bandwidth_source", "bytes_per_step_mb",
             "energy_j_per_headline", "energy_j_per_token", "energy_source", "recompiles_in_timed_run", "compile_mode",
             "sparse_kernels", "device_used_mb", "memory_note", "speculative_used")
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_low", "rougeL_high", "rows", "rows_set_aside", "rougeL_delta", "rougeL_delta_low",
              "rougeL_delta_high", "rougeL_delta_p", "rougeL_delta_p_noninferior", "rougeL_delta_sd", "rougeL_delta_rows", "rougeL_baseline",
              "noninferiority_margin", "margin_share", "lossless", "fidelity", "identical", "compared", "fidelity_reference",
              "first_difference", "baseline_identical", "token_check", "confidence")
STATES = ("non-inferior", "worse", "inconclusive")


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


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    The i-th smallest of k p-values is multiplied by (k - i + 1); adjusted values are made monotone and capped at 1.
    """
    order = sorted(pvalues, key=lambda name: pvalues[name])
    k, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (k - i) * pvalues[name]))
        out[name] = running
    return out


def quality_state(p_value: float, p_noninferior: float, delta: float, confidence: float) -> str:
    """non-inferior / worse / inconclusive from (possibly Holm-adjusted) paired-test p-values.

    non-inferior: p_noninferior < (1 - c) / 2, i.e. the lower end of the c-level interval of the difference
    is above -margin. worse: p_value < 1 - c with a negative difference, i.e. the interval lies below 0.
    A difference inside (-margin, 0) with a tight interval is both; the margin is the gate, so it is
    non-inferior (quality_difference() says it is also significantly lower).
    """
    alpha = 1 - confidence
    if p_noninferior < alpha / 2:
        return "non-inferior"
    if p_value < alpha and delta < 0:
        return "worse"
    return "inconclusive"


def rows_to_decide(delta: float, sd: float, margin: float, confidence: float, comparisons: int = 1) -> int | None:
    """Rows that would decide an inconclusive comparison at the observed mean difference and per-row sd.

    Normal approximation: the interval half-width z * sd / sqrt(n) must fit between the difference and
    -margin (to show non-inferiority) or between the difference and 0 (to show it is worse); the smaller
    n of the two that can happen. z is at level 1 - (1 - c) / comparisons (Bonferroni, a bound on Holm).

    Returns:
        the row count, or None where no n decides it (sd 0, or the difference sits exactly on a boundary).
    """
    if not (finite(delta) and finite(sd)) or sd <= 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(comparisons, 1)))
    gaps = [g for g in (delta + margin, -delta) if g > 0]
    return min(math.ceil((z * sd / g) ** 2) for g in gaps) if gaps else None


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
    if finite(perf.get("latency_s_mean")) and finite(perf.get("new_tokens_mean")) and perf["new_tokens_mean"]:
        # length-fair per-row latency: seconds per generated token (prefill included), so shorter outputs gain nothing
        row["s_per_token"] = perf["latency_s_mean"] / perf["new_tokens_mean"]
    return row


def usd_per_million(samples_per_s: Any, usd_per_hour: float | None) -> float | None:
    """What a million headlines cost at the machine's hourly price and the measured throughput."""
    return usd_per_hour / 3600 / samples_per_s * 1e6 if usd_per_hour is not None and finite(samples_per_s) and samples_per_s > 0 else None


def apply_verdicts(rows: list[Row], confidence: float) -> list[str]:
    """Set each row's quality state against the baseline, with Holm's correction across the comparisons.

    baseline is the reference (non-inferior by definition). A technique whose headlines are all identical
    to baseline's is non-inferior without a test; a lossless technique identical to another reference
    (speculative vs target_only) takes that reference's state. Every other row with a paired difference
    is one comparison of the family: its two p-values (difference from 0; non-inferiority at the margin)
    are Holm-adjusted over the family and read by quality_state(); rows_to_decide is set where the state
    is inconclusive.

    Returns:
        the family (technique names tested), in row order.
    """
    by = {r["technique"]: r for r in rows}
    family: list[str] = []
    for r in rows:
        name = r["technique"]
        if r.get("skipped") or not finite(r.get("rougeL_delta_p")):
            continue
        if name == "baseline":
            r |= {"quality_state": "non-inferior", "quality_basis": "the reference"}
        elif r.get("baseline_identical") == 1:
            r |= {"quality_state": "non-inferior", "quality_basis": "identical to baseline"}
        elif r.get("lossless") and r.get("fidelity") == 1 and r.get("fidelity_reference") not in (None, "baseline", name):
            r["quality_basis"] = f"identical to {r['fidelity_reference']}"
        else:
            family.append(name)
    p = holm({n: by[n]["rougeL_delta_p"] for n in family})
    p_ni = holm({n: by[n]["rougeL_delta_p_noninferior"] for n in family})
    for n in family:
        r = by[n]
        state = quality_state(p[n], p_ni[n], r["rougeL_delta"], confidence)
        r |= {"rougeL_delta_p_holm": p[n], "rougeL_delta_p_noninferior_holm": p_ni[n], "quality_state": state, "comparisons": len(family),
              "quality_basis": f"paired test, Holm over {len(family)} comparison(s)",
              "rows_to_decide": rows_to_decide(r["rougeL_delta"], r.get("rougeL_delta_sd"), r["noninferiority_margin"], confidence, len(family))
              if state == "inconclusive" else None}
        if state != "worse" and p[n] < 1 - confidence:
            r["quality_note"] = "significantly above baseline" if r["rougeL_delta"] > 0 else "significantly below baseline, within the margin"
    for r in rows:  # lossless copies of another technique take its state
        ref = by.get(r.get("fidelity_reference") or "")
        if r.get("quality_basis", "").startswith("identical to ") and "quality_state" not in r and ref:
            r["quality_state"] = ref.get("quality_state")
    return family


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


ELIGIBLE = "among non-inferior techniques"
ELIGIBLE_DEF = ("non-inferior: the lower end of the paired {:.0%} interval of ΔROUGE-L vs baseline is above -margin (a share of baseline "
                "ROUGE-L), Holm-adjusted across the lossy comparisons; headlines identical to baseline's count as non-inferior")


def _pick(scenario: str, pool: list[Row], key: Callable[[Row], Any], rule: str, value: Callable[[Row], str], empty: str) -> Row:
    pool = [r for r in pool if key(r) is not None]
    if not pool:
        return {"scenario": scenario, "choice": None, "rule": rule, "value": empty}
    best = min(pool, key=key)
    return {"scenario": scenario, "choice": best["technique"], "rule": rule, "value": value(best)}


def _num(r: Row, k: str) -> float | None:
    return r[k] if finite(r.get(k)) else None


def excluded(rows: list[Row]) -> list[str]:
    """Why each technique that ran is not eligible: its state, and for inconclusive ones the rows that would decide it."""
    out = []
    for r in rows:
        if r.get("skipped") or r.get("quality_state") == "non-inferior":
            continue
        state = r.get("quality_state") or "no paired difference"
        if state == "inconclusive":
            need = f"~{r['rows_to_decide']} rows would decide it" if r.get("rows_to_decide") else "no row count decides it"
            state = f"inconclusive at n={r.get('rougeL_delta_rows')} ({need})"
        out.append(f"{r['technique']}: {state}")
    return out


def recommend(rows: list[Row], balanced_within: float, gpus: int = 0, tied: Callable[[Row, Row], bool] | None = None) -> list[Row]:
    """The seed's five scenarios, each chosen by the rule printed beside it, among non-inferior techniques only.

    Speed uses seconds per generated token (s_per_token), so a technique writing shorter headlines does not
    win by it; `tied(best, other)` says whether two techniques are within noise of each other, and ties are
    named in a note. Skipped techniques are never chosen.

    Args:
        rows: headline() rows after apply_verdicts().
        balanced_within: the balanced pick's ROUGE-L tolerance (absolute) below the best eligible ROUGE-L.
        gpus: GPUs on this machine; the multi-GPU scenario needs at least 2.
        tied: speed-tie test between two rows (default: never tied).

    Returns:
        [{scenario, choice (technique or None), rule, value}], plus `note` where a pick is a close call.
    """
    ran = [r for r in rows if not r.get("skipped")]
    ok = [r for r in ran if r.get("quality_state") == "non-inferior"]
    why = "; ".join(excluded(rows))
    none_ok = "none: no technique that ran here is non-inferior to baseline" + (f" ({why})" if why else "")
    measures = sorted({r["memory_measure"] for r in ok}) or ["peak memory"]

    def speed(scenario: str, pool: list[Row], rule: str, value: Callable[[Row], str]) -> Row:
        rec = _pick(scenario, pool, lambda r: _num(r, "s_per_token"), rule, value, none_ok)
        best = next((r for r in pool if r["technique"] == rec["choice"]), None)
        ties = [r["technique"] for r in pool if best and r is not best and finite(r.get("s_per_token")) and tied and tied(best, r)]
        if ties:
            rec["note"] = f"tied within noise with {', '.join(ties)}"
        return rec

    recs = [
        speed("low latency", ok, f"lowest seconds per generated token (mean latency / mean new tokens) {ELIGIBLE}",
              lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, P50 {r['latency_s_p50']:.3f} s"),
        _pick("memory-constrained", ok, lambda r: _num(r, "peak_memory_mb"), f"lowest peak memory ({' / '.join(measures)}) {ELIGIBLE}",
              lambda r: f"{r['peak_memory_mb']:.0f} MB {r['memory_measure']}", none_ok),
    ]
    multi = [r for r in rows if r["multi_gpu"]]
    rule = f"highest tokens/s {ELIGIBLE}, that set parallel/device_map and ran on at least 2 GPUs"
    if gpus < 2:
        recs.append({"scenario": "multi-GPU", "choice": None, "rule": rule, "value": f"none: this machine has {gpus} GPU(s); the scenario needs at least 2"})
    else:
        skipped = "; ".join(f"{r['technique']}: {r['skipped']}" for r in multi if r.get("skipped")) or "no technique sets parallel or device_map"
        recs.append(_pick("multi-GPU", [r for r in ok if r["multi_gpu"]], lambda r: -r["tokens_per_s"] if finite(r.get("tokens_per_s")) else None,
                          rule, lambda r: f"{r['tokens_per_s']:.1f} tokens/s", f"none ran on this machine: {skipped}"))
    quality = _pick("highest quality", ok, lambda r: (-r["rougeL"], r.get("s_per_token") or math.inf) if finite(r.get("rougeL")) else None,
                    f"highest mean ROUGE-L (ties broken by fewer seconds per token) {ELIGIBLE}", lambda r: f"ROUGE-L {r['rougeL']:.4f}", none_ok)
    top = next((r for r in ok if r["technique"] == quality["choice"]), None)
    others = sorted((r for r in ok if r is not top and finite(r.get("rougeL"))), key=lambda r: (-r["rougeL"], r.get("s_per_token") or math.inf))
    if top and others:
        nxt = others[0]
        lo, hi = top.get("rougeL_low"), top.get("rougeL_high")
        if nxt["rougeL"] == top["rougeL"]:
            quality["note"] = f"tied with {nxt['technique']} on ROUGE-L; chosen for fewer seconds per token"
        elif finite(lo) and finite(hi) and lo <= nxt["rougeL"] <= hi:
            quality["note"] = f"not clearly better than {nxt['technique']} ({nxt['rougeL']:.4f} lies inside its interval [{lo:.4f}, {hi:.4f}])"
    recs.append(quality)
    best = max((r["rougeL"] for r in ok if finite(r.get("rougeL"))), default=None)
    near = [r for r in ok if best is not None and finite(r.get("rougeL")) and r["rougeL"] >= best - balanced_within]
    recs.append(speed("balanced", near, f"fewest seconds per generated token {ELIGIBLE}, within {balanced_within} ROUGE-L of the best of them"
                      + (f" ({best:.4f})" if best is not None else ""),
                      lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, ROUGE-L {r['rougeL']:.4f}"))
    return recs
