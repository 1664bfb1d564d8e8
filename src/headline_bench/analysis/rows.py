"""One flat headline row per technique from its perf.json and score.json."""

from __future__ import annotations

from typing import Any

from headline_bench.analysis.stats import finite

Row = dict[str, Any]


# perf.json / score.json keys copied as-is into a headline row (units are already in the names)
PERF_KEYS = ("device", "samples", "weight_mb", "latency_s_mean", "latency_s_p50", "latency_s_p90", "latency_s_p99", "latency_s_max",
             "latency_count", "ttft_s_p50", "tpot_s_p50", "samples_per_s", "tokens_per_s", "new_tokens_mean", "load_s", "acceptance_rate",
             "compile_s", "sparsity_overall", "sparsity_all_params", "sparsity_layers", "draft_weight_mb", "weight_format", "tp_size",
             "repeats", "process_count", "tokens_per_s_spread", "latency_s_mean_spread", "rss_reset", "dtype", "quality",
             "achieved_bandwidth_gbs", "bandwidth_share", "peak_bandwidth_gbs", "peak_bandwidth_source", "bytes_per_step_mb",
             "energy_j_per_headline", "energy_j_per_token", "energy_source", "recompiles_in_timed_run", "compile_mode",
             "sparse_kernels", "device_used_mb", "memory_note", "speculative_used")


SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_low", "rougeL_high", "rows", "rows_set_aside", "rougeL_delta", "rougeL_delta_low",
              "rougeL_delta_high", "rougeL_delta_p", "rougeL_delta_p_noninferior", "rougeL_delta_sd", "rougeL_delta_rows", "rougeL_baseline",
              "noninferiority_margin", "margin_share", "lossless", "fidelity", "identical", "compared", "fidelity_reference",
              "first_difference", "baseline_identical", "token_check", "confidence")


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
