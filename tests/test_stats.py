"""Paired bootstrap, Pareto front, headline rows and the recommendation rules on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stats import cdf_points, clean, headline, paired_bootstrap, pareto_front, recommend, verdict


def row(name: str, p50: float, rl: float, lo: float, hi: float, mem: float = 1000.0, tps: float = 10.0, **extra: object) -> dict:
    """A headline row with a paired ROUGE-L difference CI [lo, hi] against baseline."""
    return {"technique": name, "multi_gpu": False, "latency_s_p50": p50, "rougeL": rl, "rougeL_low": rl - 0.05, "rougeL_high": rl + 0.05,
            "rougeL_delta": (lo + hi) / 2, "rougeL_delta_low": lo, "rougeL_delta_high": hi, "peak_memory_mb": mem,
            "memory_measure": "CPU peak RSS", "tokens_per_s": tps} | extra


def pick(recs: list[dict], scenario: str) -> dict:
    return next(r for r in recs if r["scenario"] == scenario)


def test_paired_bootstrap_identical_lists_give_zero_and_a_zero_width_ci() -> None:
    a = [0.1, 0.5, 0.3, 0.9]
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_constant_shift_is_the_shift_with_a_tight_ci() -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 1, 50)
    mean, lo, hi = paired_bootstrap(list(b + 0.2), list(b))
    assert mean == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)


def test_paired_bootstrap_noise_without_shift_spans_zero_and_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    b = rng.uniform(0, 1, 40)
    a = b + rng.normal(0, 0.1, 40)
    mean, lo, hi = paired_bootstrap(list(a), list(b), n_samples=2000, seed=3)
    assert lo < 0 < hi and lo <= mean <= hi
    assert paired_bootstrap(list(a), list(b), n_samples=2000, seed=3) == (mean, lo, hi)


def test_paired_bootstrap_empty_is_nan() -> None:
    assert all(math.isnan(v) for v in paired_bootstrap([], []))


def test_pareto_front_on_known_points() -> None:
    rows = [{"technique": "a", "x": 1.0, "y": 0.1}, {"technique": "b", "x": 2.0, "y": 0.3}, {"technique": "c", "x": 3.0, "y": 0.2},
            {"technique": "d", "x": 4.0, "y": 0.5}, {"technique": "e", "x": 2.0, "y": 0.25}, {"technique": "skipped", "skipped": "no GPU"}]
    assert pareto_front(rows, "x", "y") == ["a", "b", "d"]


def test_pareto_front_keeps_exact_duplicates_and_drops_equal_x_with_lower_y() -> None:
    rows = [{"technique": "a", "x": 1.0, "y": 0.3}, {"technique": "b", "x": 1.0, "y": 0.3}, {"technique": "c", "x": 1.0, "y": 0.2}]
    assert pareto_front(rows, "x", "y") == ["a", "b"]


def test_verdict_reads_the_ci() -> None:
    assert verdict(row("w", 1, 0.2, -0.1, -0.01)) == "worse"
    assert verdict(row("b", 1, 0.2, 0.01, 0.1)) == "better"
    assert verdict(row("s", 1, 0.2, -0.01, 0.01)) == "same"
    assert verdict({"technique": "x", "skipped": "no GPU"}) is None


def test_low_latency_never_picks_a_significantly_worse_or_skipped_technique() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("prune", 0.3, 0.14, -0.2, -0.05),
            {"technique": "fast_but_skipped", "multi_gpu": False, "skipped": "llama.cpp not installed"}]
    rec = pick(recommend(rows, 0.01), "low latency")
    assert rec["choice"] == "kv_cache" and "0.500 s" in rec["value"] and "not significantly below baseline" in rec["rule"]


def test_memory_constrained_picks_lowest_peak_among_not_worse() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0, mem=1200), row("quant8", 0.7, 0.25, -0.03, 0.01, mem=800),
            row("quant4", 0.6, 0.18, -0.1, -0.02, mem=500)]
    rec = pick(recommend(rows, 0.01), "memory-constrained")
    assert rec["choice"] == "quant8" and "CPU peak RSS" in rec["rule"]


def test_multi_gpu_reports_why_none_ran() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), {"technique": "tp", "multi_gpu": True, "skipped": "this machine has 0 GPU(s)"}]
    rec = pick(recommend(rows, 0.01), "multi-GPU")
    assert rec["choice"] is None and rec["value"] == "none ran on this machine: tp: this machine has 0 GPU(s)"
    rows.append(row("pp", 0.9, 0.26, -0.01, 0.01, tps=30.0, multi_gpu=True))
    rows.append(row("tp2", 0.8, 0.26, -0.01, 0.01, tps=40.0, multi_gpu=True))
    assert pick(recommend(rows, 0.01), "multi-GPU")["choice"] == "tp2"


def test_highest_quality_breaks_ties_by_latency_and_notes_overlap() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("target", 0.9, 0.28, -0.01, 0.05)]
    rec = pick(recommend(rows, 0.01), "highest quality")
    assert rec["choice"] == "target" and "not clearly better than kv_cache" in rec["note"]
    tied = pick(recommend(rows[:2], 0.01), "highest quality")
    assert tied["choice"] == "kv_cache" and "tied with baseline" in tied["note"]


def test_highest_quality_skips_a_significantly_worse_best_score() -> None:
    # a technique can have the best aggregate ROUGE-L yet be significantly below baseline on the paired rows
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("odd", 0.9, 0.30, -0.05, -0.01)]
    assert pick(recommend(rows, 0.01), "highest quality")["choice"] == "baseline"


def test_balanced_is_fastest_within_tolerance_of_best() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("target", 0.9, 0.28, -0.01, 0.05),
            row("quant4", 0.3, 0.20, -0.09, 0.001)]
    recs = recommend(rows, 0.025)
    assert pick(recs, "balanced")["choice"] == "kv_cache"  # 0.26 >= 0.28 - 0.025; quant4 is faster but too far below
    assert pick(recs, "low latency")["choice"] == "quant4"  # not significantly worse, so eligible for pure speed
    assert pick(recommend(rows, 0.01), "balanced")["choice"] == "target"


def test_nothing_eligible_gives_no_choice() -> None:
    rows = [{"technique": "baseline", "multi_gpu": False, "skipped": "model missing"}]
    recs = recommend(rows, 0.01)
    assert len(recs) == 5 and all(r["choice"] is None for r in recs)


def test_headline_picks_memory_measure_by_device() -> None:
    cpu = headline("a", {"config": {}, "peak_rss_mb": 900.0, "latency_s_p50": 1.0}, {"rougeL": 0.2})
    gpu = headline("b", {"config": {"device_map": "auto"}, "peak_rss_mb": 900.0, "max_allocated_mb": 300.0}, {})
    assert (cpu["peak_memory_mb"], cpu["memory_measure"], cpu["multi_gpu"]) == (900.0, "CPU peak RSS", False)
    assert (gpu["peak_memory_mb"], gpu["memory_measure"], gpu["multi_gpu"]) == (300.0, "GPU max_allocated", True)
    assert headline("c", {"config": {}, "skipped": "why"}, {"skipped": "why"})["skipped"] == "why"


def test_cdf_points_and_clean() -> None:
    assert cdf_points([3.0, 1.0, float("nan"), 2.0]) == [(1.0, 1 / 3), (2.0, 2 / 3), (3.0, 1.0)]
    assert clean({"a": [float("nan"), 1.0], "b": float("inf"), "c": "x"}) == {"a": [None, 1.0], "b": None, "c": "x"}
