"""Paired t intervals, the one-rule quality states, rows to decide, latency ratios over processes, Pareto front, headline rows
and the recommendation rules on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from headline_bench.analysis.latency import process_rows, satterthwaite, speed_ratio, speed_verdict
from headline_bench.analysis.recommend import excluded, pareto_front, recommend
from headline_bench.analysis.rows import headline, usd_per_million
from headline_bench.analysis.stats import bootstrap_means, cdf_points, clean, mean_interval, paired_t, t_quantile
from headline_bench.analysis.verdicts import compare, decide, family_of, resolve_equivalents, rows_to_decide, simultaneous_level
from headline_bench.errors import InputError
from headline_bench.settings import Score, Technique

SCORE = Score(confidence=0.95, margin=0.01, min_rows=30, power=0.8)


def row(name: str, p50: float, rl: float, lo: float, hi: float, mem: float = 1000.0, tps: float = 10.0, **extra: object) -> dict:
    """A headline row with a paired ROUGE-L difference interval [lo, hi] against baseline, already judged by the rule."""
    state = "reference" if name == "baseline" else decide(lo, hi, 0.01, 100, 30)[0]
    return {"technique": name, "multi_gpu": False, "latency_s_p50": p50, "s_per_token": p50 / 20, "rougeL": rl, "rougeL_low": rl - 0.05,
            "rougeL_high": rl + 0.05, "rougeL_delta": (lo + hi) / 2, "rougeL_delta_low": lo, "rougeL_delta_high": hi, "peak_memory_mb": mem,
            "memory_measure": "CPU peak RSS", "tokens_per_s": tps, "quality_state": state, "rougeL_delta_rows": 100, "rows_to_decide": 400,
            "rows_to_decide_state": "worse"} | extra


def pick(recs: list[dict], scenario: str) -> dict:
    return next(r for r in recs if r["scenario"] == scenario)


def test_t_quantile_matches_tables() -> None:
    assert t_quantile(0.975, 11) == pytest.approx(2.2010, abs=1e-4)
    assert t_quantile(0.975, 29) == pytest.approx(2.0452, abs=1e-4)
    assert t_quantile(0.8, 99) == pytest.approx(0.8452, abs=1e-4)
    assert t_quantile(0.025, 11) == pytest.approx(-2.2010, abs=1e-4)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)


def test_paired_t_interval_on_known_numbers() -> None:
    t = paired_t([0.1, 0.2, 0.3, 0.4], 0.95)  # mean 0.25, sd 0.1291, t_{3} 3.1824 -> half 0.2054
    assert t["delta"] == pytest.approx(0.25) and t["low"] == pytest.approx(0.25 - 0.20543, abs=1e-4) and t["rows"] == 4
    same = paired_t([0.0] * 40, 0.99)
    assert (same["low"], same["high"], same["sd"]) == (0.0, 0.0, 0.0)
    assert paired_t([0.1], 0.95)["low"] is None


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


def test_decide_follows_the_printed_interval() -> None:
    assert decide(-0.005, 0.02, 0.01, 100, 30) == ("non-inferior", None)
    assert decide(-0.008, -0.001, 0.01, 100, 30) == ("non-inferior", "significantly below, within the margin")
    assert decide(0.001, 0.02, 0.01, 100, 30) == ("non-inferior", "significantly above the reference")
    assert decide(-0.05, -0.011, 0.01, 100, 30) == ("worse", None)  # the whole interval beyond the margin
    # below 0 but not beyond -margin: a real loss of unknown size, not "worse" (it could be -0.005)
    assert decide(-0.0246, -0.001, 0.01, 100, 30) == ("inconclusive", "significantly below the reference, not beyond the margin")
    assert decide(-0.05, 0.01, 0.01, 100, 30) == ("inconclusive", None)
    assert decide(-0.001, 0.001, 0.01, 12, 30) == ("too few rows", None)


def test_family_comes_from_params_not_from_what_ran() -> None:
    techniques = {"baseline": None, "kv_cache": Technique(reference="baseline"), "quant4": None, "target_only": None, "odd": None}
    s = SCORE.model_copy(update={"family": ["quant4", "quant8", "vllm"], "model_comparisons": ["target_only"]})
    assert family_of("quant4", techniques, s) == ("lossy", 3)  # quant8 and vllm are not even in techniques: still counted
    assert family_of("target_only", techniques, s) == ("model comparison", 1)
    assert family_of("kv_cache", techniques, s) == ("lossy", 3)  # a lossless fallback is tested at the family's level
    with pytest.raises(InputError, match="odd"):
        family_of("odd", techniques, s)
    assert simultaneous_level(0.95, 8) == pytest.approx(1 - 0.05 / 8)


def test_compare_uses_the_simultaneous_level_and_names_the_state_more_rows_would_decide() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(-0.02, 0.08, 100)
    one, eight = compare(list(d), "lossy", 1, SCORE), compare(list(d), "lossy", 8, SCORE)
    assert eight["rougeL_delta_low"] < one["rougeL_delta_low"] and eight["interval_level"] == pytest.approx(0.99375)
    for c in (one, eight):
        assert c["quality_state"] == decide(c["rougeL_delta_low"], c["rougeL_delta_high"], 0.01, 100, 30)[0]
    assert eight["quality_state"] == "inconclusive" and eight["rows_to_decide_state"] == "worse" and eight["rows_to_decide"] > 100
    few = compare(list(d[:12]), "lossy", 8, SCORE)
    assert few["quality_state"] == "too few rows" and few["rows_to_decide"] >= 30


def test_rows_to_decide_names_the_earlier_decision() -> None:
    # both states sit on -margin: above it only non-inferior is reachable, below it only worse (gap to -margin, not to 0)
    n, state = rows_to_decide(0.0, 0.1, 0.01, 0.95, 0.8, 30)
    assert state == "non-inferior" and 780 <= n <= 800  # ((1.96 + 0.84) x 0.1 / 0.01)^2 = 785 at the normal limit
    assert rows_to_decide(-0.02, 0.1, 0.01, 0.95, 0.8, 30) == rows_to_decide(0.0, 0.1, 0.01, 0.95, 0.8, 30)[:1] + ("worse",)  # same gap 0.01
    assert rows_to_decide(-0.002, 0.1, 0.01, 0.95, 0.8, 30)[1] == "non-inferior"
    assert rows_to_decide(-0.008, 0.1, 0.01, 0.95, 0.8, 30)[1] == "non-inferior"  # inside the margin: never worse
    assert rows_to_decide(-0.01, 0.1, 0.01, 0.95, 0.8, 30) == (None, None)  # on the boundary
    assert rows_to_decide(0.0, 0.0, 0.01, 0.95, 0.8, 30) == (None, None)
    assert rows_to_decide(0.05, 0.01, 0.01, 0.95, 0.8, 30)[0] == 30  # never fewer than min_rows


def test_speed_ratio_over_processes_and_the_equivalence_verdict() -> None:
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(40)]
    tokens = {i: float(rng.integers(8, 24)) for i in ids}
    base = {i: 0.05 * tokens[i] for i in ids}

    def procs(scale: float, jitter: float, n: int) -> list[dict]:
        return [{i: (base[i] * scale * (1 + rng.normal(0, jitter)), tokens[i]) for i in ids} for _ in range(n)]
    ref = procs(1.0, 0.01, 3)
    assert speed_ratio(procs(1.0, 0.01, 3), ref, 0.95, 2000, 0, 0.05)["verdict"] == "tied"
    assert speed_ratio(procs(0.5, 0.01, 3), ref, 0.95, 2000, 0, 0.05)["verdict"] == "faster"
    assert speed_ratio(procs(1.5, 0.01, 3), ref, 0.95, 2000, 0, 0.05)["verdict"] == "slower"
    noisy = speed_ratio(procs(1.0, 0.3, 3), procs(1.0, 0.3, 3), 0.95, 2000, 0, 0.05)
    assert noisy["verdict"] == "unresolved" and noisy["low"] < 0.95  # absence of evidence is not a tie
    two = speed_ratio(procs(1.0, 0.01, 2), ref, 0.95, 2000, 0, 0.05)
    assert two["verdict"].startswith("n/a: fewer than 3 processes") and two["low"] is None and two["rows_low"] < 1.05
    assert speed_verdict(0.97, 0.99, 0.05) == "tied" and speed_verdict(0.90, 0.99, 0.05) == "faster"
    assert speed_verdict(0.94, 1.06, 0.05, 0.955, 1.045) == "tied"  # the 90% interval (TOST at 5%) decides a tie, not the 95% one
    tied = speed_ratio(procs(1.0, 0.01, 3), ref, 0.95, 2000, 0, 0.05)
    assert tied["tie_level"] == pytest.approx(0.90) and tied["low"] < tied["tie_low"] < tied["ratio"] < tied["tie_high"] < tied["high"]
    assert tied["verdict"] == speed_verdict(tied["low"], tied["high"], 0.05, tied["tie_low"], tied["tie_high"])


def test_satterthwaite_degrees_of_freedom() -> None:
    # Welch's example: two variances of the mean 1.0 with 9 and 4 df -> 4 / (1/9 + 1/4) = 11.08, between min (4) and sum (13)
    assert satterthwaite([(1.0, 9), (1.0, 4)]) == pytest.approx(4 / (1 / 9 + 1 / 4))
    assert satterthwaite([(1.0, 9), (0.0, 4)]) == pytest.approx(9)  # a part with no variance adds nothing
    assert satterthwaite([(0.0, 2)]) == 1e7


def test_unequal_process_counts_use_welch_degrees_of_freedom() -> None:
    """3 noisy processes against 6 quiet ones: the variance and its df come from the noisy side (about 2)."""
    rng = np.random.default_rng(4)
    ids = [f"r{i}" for i in range(30)]
    def procs(sd: float, n: int) -> list[dict]:  # process-to-process drift (one factor per process), tiny row noise
        return [{i: ((1 + f) * (1 + rng.normal(0, 0.001)), 20.0) for i in ids} for f in rng.normal(0, sd, n)]
    noisy, quiet = procs(0.1, 3), procs(0.001, 6)
    a = speed_ratio(noisy, quiet, 0.95, 500, 0, 0.05)
    assert "unpaired" in a["basis"] and 1.9 < a["df"] < 2.2  # ~2: the noisy side's 3 processes carry the variance


def test_process_rows_groups_passes_by_process() -> None:
    perf = {"passes": [{"process": 0}, {"process": 0}, {"process": 1}]}
    recs = [{"id": "a", "prediction": "x", "latency_s": 2.0, "new_tokens": 10, "latency_s_passes": [1.0, 3.0, 5.0]},
            {"id": "b", "prediction": None, "latency_s": 1.0, "new_tokens": 3}]
    assert process_rows(perf, recs) == [{"a": (2.0, 10)}, {"a": (5.0, 10)}]
    assert process_rows({}, recs[:1]) == [{"a": (3.0, 10)}]  # no process per pass: one process, the mean of its passes
    assert process_rows({}, [{"id": "a", "prediction": "x", "latency_s": 2.0, "new_tokens": 10}]) == [{"a": (2.0, 10)}]


def test_usd_per_million() -> None:
    assert usd_per_million(2.0, 3.6) == pytest.approx(500.0)  # 3.6 USD/h = 0.001 USD/s; 2 headlines/s -> 0.0005 USD each
    assert usd_per_million(2.0, None) is None and usd_per_million(None, 3.6) is None


def test_equivalent_techniques_take_their_reference_state_and_rows_to_decide() -> None:
    rows = [{"technique": "baseline", "quality_state": "reference"}, {"technique": "kv_cache", "quality_state": "equivalent", "quality_reference": "baseline"},
            {"technique": "target_only", "quality_state": "inconclusive", "rows_to_decide": 900, "rows_to_decide_state": "non-inferior"},
            {"technique": "speculative", "quality_state": "equivalent", "quality_reference": "target_only"},
            {"technique": "quant4", "quality_state": "worse"}]
    resolve_equivalents(rows)
    by = {r["technique"]: r for r in rows}
    assert by["kv_cache"]["quality_effective"] == "reference" and by["quant4"]["quality_effective"] == "worse"
    assert by["speculative"]["quality_effective"] == "inconclusive" and by["speculative"]["rows_to_decide"] == 900
    assert excluded(rows) == ["target_only: inconclusive at n=None (~900 rows would decide it non-inferior)",
                              "speculative: equivalent to target_only, which is inconclusive at n=None (~900 rows would decide it non-inferior)",
                              "quant4: worse"]


def test_low_latency_never_picks_a_worse_inconclusive_or_skipped_technique() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("prune", 0.3, 0.14, -0.2, -0.05),
            row("quant4", 0.2, 0.24, -0.05, 0.002), {"technique": "fast_but_skipped", "multi_gpu": False, "skipped": "llama.cpp not installed"}]
    rec = pick(recommend(rows, 0.01), "low latency")
    assert rec["choice"] == "kv_cache" and "25.0 ms/token" in rec["value"] and "eligible" in rec["rule"]


def test_low_latency_is_length_fair_and_names_ties() -> None:
    # short_writer has the lowest P50 only because it writes half the tokens: per token it is slower
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("short_writer", 0.4, 0.26, 0, 0, s_per_token=0.04),
            row("close", 0.51, 0.26, 0, 0)]
    verdicts = {"close": "tied", "baseline": "slower", "short_writer": "unresolved"}
    rec = pick(recommend(rows, 0.01, speed=lambda a, b: verdicts[b["technique"]]), "low latency")
    assert rec["choice"] == "kv_cache"
    assert rec["note"] == "tied (ratio interval within the tie bounds) with close; not resolved from short_writer"


def test_none_eligible_says_why() -> None:
    rows = [row("quant4", 0.2, 0.24, -0.05, 0.002), row("prune", 0.3, 0.14, -0.2, -0.05)]
    rec = pick(recommend(rows, 0.01), "low latency")
    assert rec["choice"] is None
    assert rec["value"] == "none: no technique that ran here is eligible (quant4: inconclusive at n=100 (~400 rows would decide it worse); prune: worse)"


def test_fidelity_within_bound_makes_a_technique_eligible_unless_rouge_found_it_worse() -> None:
    """On the defaults ROUGE says "too few rows" for every lossy technique: fidelity within bound settles it instead;
    fidelity beyond bound or inconclusive does not, and neither does within bound when ROUGE found it worse."""
    rows = [row("kv_cache", 0.5, 0.26, 0, 0), row("llamacpp", 0.2, 0.26, -0.01, 0.01) | {"quality_state": "too few rows", "fidelity_state": "within bound"},
            row("quant4", 0.1, 0.24, -0.02, 0.01) | {"quality_state": "too few rows", "fidelity_state": "beyond bound"},
            row("odd", 0.05, 0.1, -0.2, -0.05) | {"fidelity_state": "within bound"}]
    assert rows[-1]["quality_state"] == "worse"
    assert pick(recommend(rows, 0.01), "low latency")["choice"] == "llamacpp"
    assert [e.split(":")[0] for e in excluded(rows)] == ["quant4", "odd"] and "fidelity beyond bound" in excluded(rows)[0]


def test_memory_constrained_picks_lowest_peak_among_non_inferior() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0, mem=1200), row("quant8", 0.7, 0.25, -0.005, 0.01, mem=800),
            row("quant4", 0.6, 0.18, -0.1, -0.02, mem=500), row("nf4_maybe", 0.6, 0.25, -0.03, 0.01, mem=400)]
    rec = pick(recommend(rows, 0.01), "memory-constrained")
    assert rec["choice"] == "quant8" and "CPU peak RSS" in rec["rule"] and "note" not in rec


def test_memory_ties_go_to_the_speed_interval_else_to_the_stated_precedence() -> None:
    # 0.3 MB of ~1,032 is no win: both are within 2% of the lowest
    rows = [row("baseline", 1.6, 0.26, 0, 0, mem=1032.3), row("kv_cache", 0.5, 0.26, 0, 0, mem=1032.6), row("big", 0.4, 0.26, 0, 0, mem=1200)]
    shown = pick(recommend(rows, 0.01, speed=lambda a, b: "slower", memory_tie=0.02), "memory-constrained")
    assert shown["choice"] == "kv_cache" and shown["note"] == ("tied on memory with baseline (1032 MB); faster than the other tied ones by "
                                                              "the ms/token ratio interval")
    # a lower point estimate whose ratio interval does not separate them is no reason: the fixed precedence decides
    unresolved = pick(recommend(rows, 0.01, speed=lambda a, b: "unresolved", memory_tie=0.02), "memory-constrained")
    assert unresolved["choice"] == "baseline" and "by precedence (baseline, then techniques equivalent" in unresolved["note"]
    assert pick(recommend(rows, 0.01), "memory-constrained")["choice"] == "baseline"  # no speed verdicts at all
    assert pick(recommend(rows, 0.01, memory_tie=0.0), "memory-constrained")["choice"] == "baseline"


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


def test_highest_quality_needs_a_gain_whose_interval_clears_the_tie() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0, quality_state="equivalent", quality_reference="baseline"),
            row("torchao", 0.4, 0.26, 0, 0, baseline_identical=1.0), row("target", 0.9, 0.28, 0.0005, 0.0391)]
    resolve_equivalents(rows)
    # target_only's +0.0198 [+0.0005, +0.0391] once won "highest quality": its interval does not clear the 0.01 tie
    rec = pick(recommend(rows, 0.01), "highest quality")
    assert rec["choice"] == "baseline" and rec["note"].startswith("higher point estimate but no gain") and "target (0.2800" in rec["note"]
    rows[3] = row("target", 0.9, 0.28, 0.012, 0.05)
    assert pick(recommend(rows, 0.01), "highest quality")["choice"] == "target"
    assert pick(recommend(rows[:3], 0.01), "highest quality")["choice"] == "baseline"  # never kv_cache or torchao on a speed tie-break


def test_highest_quality_skips_a_worse_best_score() -> None:
    # a technique can have the best mean ROUGE-L yet be judged worse on the paired rows
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("odd", 0.9, 0.30, -0.05, -0.01)]
    assert pick(recommend(rows, 0.01), "highest quality")["choice"] == "baseline"


def test_balanced_is_fastest_within_tolerance_of_the_best_credible_quality() -> None:
    rows = [row("baseline", 1.6, 0.26, 0, 0), row("kv_cache", 0.5, 0.26, 0, 0), row("target", 0.9, 0.28, -0.005, 0.05),
            row("quant8", 0.3, 0.20, -0.009, 0.001)]
    recs = recommend(rows, 0.01)
    assert pick(recs, "balanced")["choice"] == "kv_cache"  # target's 0.28 is no gain, so the best is baseline's 0.26; quant8 too far below
    assert pick(recs, "low latency")["choice"] == "quant8"  # non-inferior, so eligible for pure speed
    rows[2] = row("target", 0.9, 0.28, 0.015, 0.05)  # a gain: the best is now 0.28 and only target is within 0.01 of it
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


def test_every_technique_in_params_yaml_has_a_quality_family() -> None:
    """The score stage refuses a lossy technique that no family names; checked here on the real params.yaml so that a new
    technique is caught before a 90-minute `dvc repro` stops at its score stage (compiled_loop_cpu once did)."""
    from headline_bench.settings import load_params

    params = load_params()
    for name in params.techniques:
        if name != "baseline":
            family_of(name, params.techniques, params.score)  # raises InputError naming the technique


def test_cpu_identity_reads_family_model_and_kernel_flags() -> None:
    """The fingerprint tells CPU generations apart that share a model name ("AMD EPYC"): family/model from /proc/cpuinfo and
    only the kernel-relevant flags, in KERNEL_FLAGS order."""
    from pathlib import Path

    from headline_bench.measure.environment import KERNEL_FLAGS, cpu_identity

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo")
    block = dict(line.split(":", 1) for line in info.read_text().split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in block.items()}
    ident, isa = cpu_identity()
    assert ident == f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']} stepping {fields['stepping']}"
    flags = set(fields["flags"].split())
    assert isa == (" ".join(f for f in KERNEL_FLAGS if f in flags) or "none")


def test_mean_interval_widens_only_the_skewed_end() -> None:
    """Symmetric rows: the paired t interval. Rows with a few large losses: the lower end moves down (Hall's correction),
    the upper end stays t's (the wider of the two at each end)."""
    sym = mean_interval([0.1, 0.2, 0.3, 0.4], 0.95)
    t = paired_t([0.1, 0.2, 0.3, 0.4], 0.95)
    assert (sym["low"], sym["high"]) == pytest.approx((t["low"], t["high"])) and "Hall" in sym["method"]
    rows = [0.0] * 90 + [0.05, -0.05] * 3 + [-0.4] * 4
    skewed, t = mean_interval(rows, 0.99), paired_t(rows, 0.99)
    assert skewed["low"] < t["low"] - 0.002 and skewed["high"] == pytest.approx(t["high"])
    assert mean_interval([0.0] * 40, 0.99)["low"] == 0.0 and mean_interval([0.1], 0.95)["low"] is None


def test_pooled_latency_uses_each_process_own_values() -> None:
    """merge_processes once wrote the cross-process row mean into process 1's records before pooling, so process 1 counted
    1/9 and processes 2 and 3 4/9 each: batched printed 6.920 [6.894, 6.894], its point outside its own interval."""
    from headline_bench.measure.runner import merge_processes

    lat = [[1.0, 1.0], [2.0, 2.0], [6.0, 6.0]]  # per process, per row

    def process(k: int) -> dict:
        recs = [{"id": f"r{i}", "prediction": "x", "raw": "x", "prompt_tokens": 5, "new_tokens": 10, "latency_s": v, "ttft_s": v / 10,
                 "tpot_s": v / 20, "token_ids": [1, 2]} for i, v in enumerate(lat[k])]
        return {"records": recs, "perf": {"samples_per_s": 2 / sum(lat[k]), "tokens_per_s": 20 / sum(lat[k]), "wall_s": sum(lat[k]), "rss_reset": True,
                                          "latency_s_mean": lat[k][0]}}
    records, perf = merge_processes([process(0), process(1), process(2)])
    assert perf["latency_s_mean"] == pytest.approx(3.0) and perf["latency_s_p50"] == pytest.approx(2.0)  # old: 3.667 and 3.0
    assert perf["ttft_s_mean"] == pytest.approx(0.3) and perf["latency_count"] == 6
    assert [r["latency_s"] for r in records] == [pytest.approx(3.0)] * 2 and records[0]["latency_s_processes"] == [1.0, 2.0, 6.0]
    assert [p["latency_s"] for p in perf["processes"]] == lat
