"""Bootstrap intervals and p-values, Holm, quality states, rows to decide, paired ratios, Pareto front, headline rows
and the recommendation rules on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from headline_bench.analysis.recommend import excluded, pareto_front, recommend
from headline_bench.analysis.rows import headline, usd_per_million
from headline_bench.analysis.stats import bootstrap_means, cdf_points, clean, paired_bootstrap, paired_ratio, paired_test
from headline_bench.analysis.verdicts import apply_verdicts, holm, quality_state, rows_to_decide


def row(name: str, p50: float, rl: float, lo: float, hi: float, mem: float = 1000.0, tps: float = 10.0, **extra: object) -> dict:
    """A headline row with a paired ROUGE-L difference CI [lo, hi] against baseline, already judged."""
    state = "non-inferior" if lo > -0.01 else "worse" if hi < 0 else "inconclusive"
    return {"technique": name, "multi_gpu": False, "latency_s_p50": p50, "s_per_token": p50 / 20, "rougeL": rl, "rougeL_low": rl - 0.05,
            "rougeL_high": rl + 0.05, "rougeL_delta": (lo + hi) / 2, "rougeL_delta_low": lo, "rougeL_delta_high": hi, "peak_memory_mb": mem,
            "memory_measure": "CPU peak RSS", "tokens_per_s": tps, "quality_state": state, "rougeL_delta_rows": 100, "rows_to_decide": 400} | extra


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


def test_bootstrap_means_keeps_pairs_and_is_seeded() -> None:
    x = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]])
    dist = bootstrap_means(x, 10_000, seed=1)
    assert dist.shape == (10_000, 2)
    assert np.allclose(dist[:, 1], 2 * dist[:, 0])  # the same rows resampled for both columns
    assert dist[:, 0].mean() == pytest.approx(2.5, abs=0.02) and np.array_equal(dist, bootstrap_means(x, 10_000, seed=1))


def test_paired_test_p_values_agree_with_the_interval() -> None:
    rng = np.random.default_rng(4)
    b = rng.uniform(0, 1, 200)
    worse = paired_test(list(b - 0.05 + rng.normal(0, 0.05, 200)), list(b), 0.001, 10_000, 0.95, 0)
    assert worse["high"] < 0 and worse["p_value"] < 0.05 and worse["p_noninferior"] > 0.025
    assert quality_state(worse["p_value"], worse["p_noninferior"], worse["delta"], 0.95) == "worse"
    same = paired_test(list(b), list(b), 0.01, 10_000, 0.95, 0)
    assert same["p_value"] == 1.0 and same["p_noninferior"] == pytest.approx(1 / 10_001) and same["sd"] == 0.0
    assert quality_state(same["p_value"], same["p_noninferior"], 0.0, 0.95) == "non-inferior"
    noisy = paired_test(list(b + rng.normal(0, 0.2, 200)), list(b), 0.01, 10_000, 0.95, 0)
    assert noisy["low"] < -0.01 < 0 < noisy["high"] and quality_state(noisy["p_value"], noisy["p_noninferior"], noisy["delta"], 0.95) == "inconclusive"


def test_non_inferior_needs_the_lower_end_above_the_margin_not_just_an_interval_spanning_zero() -> None:
    # quant4 on 100 rows: -0.0217 [-0.048, +0.002] was "no significant difference"; at a 1% margin it is not non-inferior
    rng = np.random.default_rng(5)
    b = rng.uniform(0.1, 0.4, 100)
    a = b - 0.0217 + rng.normal(0, 0.065, 100)
    t = paired_test(list(a), list(b), 0.01 * b.mean(), 10_000, 0.95, 0)
    assert t["low"] < -0.01 * b.mean()  # the interval reaches below -margin
    assert quality_state(t["p_value"], t["p_noninferior"], t["delta"], 0.95) != "non-inferior"


def test_holm_adjusts_step_down_and_stays_monotone() -> None:
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})  # 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06)
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}


def test_rows_to_decide_from_the_normal_half_width() -> None:
    # delta 0, sd 0.1, margin 0.01: z 1.96 -> (1.96 * 0.1 / 0.01)^2 = 384.1 -> 385 rows
    assert rows_to_decide(0.0, 0.1, 0.01, 0.95) == 385
    # delta -0.02 below -margin: only "worse" can be shown: (1.96 * 0.1 / 0.02)^2 = 96.04 -> 97
    assert rows_to_decide(-0.02, 0.1, 0.01, 0.95) == 97
    assert rows_to_decide(-0.005, 0.1, 0.01, 0.95) == 1537  # both gaps 0.005: the same n
    assert rows_to_decide(0.0, 0.0, 0.01, 0.95) is None
    assert rows_to_decide(0.0, 0.1, 0.01, 0.95, comparisons=8) > 385  # Bonferroni level for 8 comparisons


def test_paired_ratio_of_means_and_per_token() -> None:
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    assert paired_ratio(a, b, 2000, 0.95, 0) == pytest.approx((2.0, 2.0, 2.0))
    # a is twice as slow per row but writes twice the tokens: the same time per token
    assert paired_ratio(a, b, 2000, 0.95, 0, [20, 40, 60], [10, 20, 30]) == pytest.approx((1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 2, 50)
    r, lo, hi = paired_ratio(list(x * rng.normal(1.1, 0.05, 50)), list(x), 10_000, 0.95, 0)
    assert lo < r < hi and 1.0 < lo and hi < 1.2


def test_usd_per_million() -> None:
    assert usd_per_million(2.0, 3.6) == pytest.approx(500.0)  # 3.6 USD/h = 0.001 USD/s; 2 headlines/s -> 0.0005 USD each
    assert usd_per_million(2.0, None) is None and usd_per_million(None, 3.6) is None


def scored(name: str, delta: float, lo: float, hi: float, p: float, p_ni: float, **extra: object) -> dict:
    return {"technique": name, "multi_gpu": False, "rougeL_delta": delta, "rougeL_delta_low": lo, "rougeL_delta_high": hi, "rougeL_delta_p": p,
            "rougeL_delta_p_noninferior": p_ni, "rougeL_delta_sd": 0.1, "noninferiority_margin": 0.0026, "rougeL_delta_rows": 100,
            "baseline_identical": 0.0} | extra


def test_apply_verdicts_uses_holm_and_inherits_for_lossless_copies() -> None:
    rows = [scored("baseline", 0, 0, 0, 1.0, 1e-4, baseline_identical=1.0), scored("kv_cache", 0, 0, 0, 1.0, 1e-4, baseline_identical=1.0),
            scored("target_only", 0.02, 0.001, 0.04, 0.04, 0.001),
            scored("speculative", 0.02, 0.001, 0.04, 0.04, 0.001, lossless=True, fidelity=1.0, fidelity_reference="target_only"),
            scored("quant4", -0.02, -0.05, 0.002, 0.12, 0.6), scored("prune", -0.1, -0.15, -0.05, 0.0001, 0.99),
            scored("edge", 0.0, -0.002, 0.003, 1.0, 0.02), {"technique": "vllm", "multi_gpu": False, "skipped": "no GPU"}]
    family = apply_verdicts(rows, 0.95)
    by = {r["technique"]: r for r in rows}
    assert family == ["target_only", "quant4", "prune", "edge"]
    assert by["baseline"]["quality_state"] == by["kv_cache"]["quality_state"] == "non-inferior"
    assert by["prune"]["quality_state"] == "worse" and by["prune"]["rougeL_delta_p_holm"] == pytest.approx(4 * 0.0001)
    assert by["quant4"]["quality_state"] == "inconclusive" and by["quant4"]["rows_to_decide"] > 0
    assert by["target_only"]["quality_state"] == "non-inferior"
    assert by["speculative"]["quality_state"] == "non-inferior" and by["speculative"]["quality_basis"] == "identical to target_only"
    # 0.02 alone would pass (< 0.025); Holm over 4 comparisons makes it 0.02 x 2 or more: not shown non-inferior
    assert by["edge"]["quality_state"] == "inconclusive" and by["edge"]["rougeL_delta_p_noninferior_holm"] >= 0.04
    assert "quality_state" not in by["vllm"]
    assert excluded(rows) == ["quant4: inconclusive at n=100 (~" + str(by["quant4"]["rows_to_decide"]) + " rows would decide it)", "prune: worse",
                              "edge: inconclusive at n=100 (~" + str(by["edge"]["rows_to_decide"]) + " rows would decide it)"]


def test_low_latency_never_picks_a_worse_inconclusive_or_skipped_technique() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("prune", 0.3, 0.14, -0.2, -0.05),
            row("quant4", 0.2, 0.24, -0.05, 0.002), {"technique": "fast_but_skipped", "multi_gpu": False, "skipped": "llama.cpp not installed"}]
    rec = pick(recommend(rows, 0.01), "low latency")
    assert rec["choice"] == "kv_cache" and "25.0 ms/token" in rec["value"] and "non-inferior" in rec["rule"]


def test_low_latency_is_length_fair_and_names_ties() -> None:
    # short_writer has the lowest P50 only because it writes half the tokens: per token it is slower
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("short_writer", 0.4, 0.26, 0, 0, s_per_token=0.04),
            row("close", 0.51, 0.26, 0, 0)]
    rec = pick(recommend(rows, 0.01, tied=lambda a, b: b["technique"] == "close"), "low latency")
    assert rec["choice"] == "kv_cache" and rec["note"] == "tied within noise with close"


def test_none_eligible_says_why() -> None:
    rows = [row("quant4", 0.2, 0.24, -0.05, 0.002), row("prune", 0.3, 0.14, -0.2, -0.05)]
    rec = pick(recommend(rows, 0.01), "low latency")
    assert rec["choice"] is None
    assert rec["value"] == "none: no technique that ran here is non-inferior to baseline (quant4: inconclusive at n=100 (~400 rows would decide it); prune: worse)"


def test_memory_constrained_picks_lowest_peak_among_non_inferior() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0, mem=1200), row("quant8", 0.7, 0.25, -0.005, 0.01, mem=800),
            row("quant4", 0.6, 0.18, -0.1, -0.02, mem=500), row("nf4_maybe", 0.6, 0.25, -0.03, 0.01, mem=400)]
    rec = pick(recommend(rows, 0.01), "memory-constrained")
    assert rec["choice"] == "quant8" and "CPU peak RSS" in rec["rule"]


def test_multi_gpu_needs_two_gpus() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("tp", 0.9, 0.26, 0, 0, tps=30.0, multi_gpu=True)]
    rec = pick(recommend(rows, 0.01, gpus=0), "multi-GPU")
    assert rec["choice"] is None and rec["value"] == "none: this machine has 0 GPU(s); the scenario needs at least 2"
    rows.append({"technique": "pp", "multi_gpu": True, "skipped": "this machine has 1 GPU(s)"})
    assert pick(recommend(rows, 0.01, gpus=1), "multi-GPU")["choice"] is None
    rows.append(row("tp2", 0.8, 0.26, -0.005, 0.01, tps=40.0, multi_gpu=True))
    assert pick(recommend(rows, 0.01, gpus=2), "multi-GPU")["choice"] == "tp2"
    only_skipped = [row("baseline", 1.6, 0.26, 0, 0), {"technique": "pp", "multi_gpu": True, "skipped": "oom"}]
    assert pick(recommend(only_skipped, 0.01, gpus=2), "multi-GPU")["value"] == "none ran on this machine: pp: oom"


def test_highest_quality_breaks_ties_by_speed_and_notes_overlap() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("target", 0.9, 0.28, -0.005, 0.05)]
    rec = pick(recommend(rows, 0.01), "highest quality")
    assert rec["choice"] == "target" and "not clearly better than kv_cache" in rec["note"]
    tied = pick(recommend(rows[:2], 0.01), "highest quality")
    assert tied["choice"] == "kv_cache" and "tied with baseline" in tied["note"]


def test_highest_quality_skips_a_worse_best_score() -> None:
    # a technique can have the best mean ROUGE-L yet be judged worse on the paired rows
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("odd", 0.9, 0.30, -0.05, -0.01)]
    assert pick(recommend(rows, 0.01), "highest quality")["choice"] == "baseline"


def test_balanced_is_fastest_within_tolerance_of_best() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("target", 0.9, 0.28, -0.005, 0.05),
            row("quant8", 0.3, 0.20, -0.009, 0.001)]
    recs = recommend(rows, 0.025)
    assert pick(recs, "balanced")["choice"] == "kv_cache"  # 0.26 >= 0.28 - 0.025; quant8 is faster but too far below
    assert pick(recs, "low latency")["choice"] == "quant8"  # non-inferior, so eligible for pure speed
    assert pick(recommend(rows, 0.01), "balanced")["choice"] == "target"


def test_nothing_eligible_gives_no_choice() -> None:
    rows = [{"technique": "baseline", "multi_gpu": False, "skipped": "model missing"}]
    recs = recommend(rows, 0.01)
    assert len(recs) == 5 and all(r["choice"] is None for r in recs)


def test_headline_picks_memory_measure_by_device_and_speed_per_token() -> None:
    cpu = headline("a", {"config": {}, "peak_rss_mb": 900.0, "latency_s_p50": 1.0, "latency_s_mean": 1.2, "new_tokens_mean": 24.0}, {"rougeL": 0.2})
    gpu = headline("b", {"config": {"device_map": "auto"}, "peak_rss_mb": 900.0, "max_allocated_mb": 300.0}, {})
    assert (cpu["peak_memory_mb"], cpu["memory_measure"], cpu["multi_gpu"]) == (900.0, "CPU peak RSS", False)
    assert cpu["s_per_token"] == pytest.approx(0.05) and "s_per_token" not in gpu
    assert (gpu["peak_memory_mb"], gpu["memory_measure"], gpu["multi_gpu"]) == (300.0, "GPU max_allocated", True)
    assert headline("c", {"config": {}, "skipped": "why"}, {"skipped": "why"})["skipped"] == "why"


def test_cdf_points_and_clean() -> None:
    assert cdf_points([3.0, 1.0, float("nan"), 2.0]) == [(1.0, 1 / 3), (2.0, 2 / 3), (3.0, 1.0)]
    assert clean({"a": [float("nan"), 1.0], "b": float("inf"), "c": "x"}) == {"a": [None, 1.0], "b": None, "c": "x"}
