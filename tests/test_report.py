"""The report stage end to end on fabricated metrics: files, table rows, skipped rows, focus keys, PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headline_bench.render import report

ENV = {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0", "cpu": "Fake CPU", "cpu_count": 2, "torch_threads": 2,
       "device": "cpu (Fake CPU, 2 cores)", "gpu_count": 0}
# name: (p50 latency s, ROUGE-L, delta CI low, delta CI high, peak RSS MB, weight MB, identical to baseline?, p vs 0, p non-inferiority)
FAKE = {
    "baseline": (1.60, 0.262, 0.0, 0.0, 1210.0, 513.0, True, 1.0, 1e-4),
    "kv_cache": (0.46, 0.262, 0.0, 0.0, 1230.0, 513.0, True, 1.0, 1e-4),
    "quant8": (0.71, 0.255, -0.030, 0.012, 820.0, 172.0, False, 0.4, 0.3),
    "prune_l1": (0.44, 0.141, -0.170, -0.070, 1215.0, 513.0, False, 1e-4, 0.99),
    "target_only": (0.93, 0.301, 0.004, 0.081, 1650.0, 1030.0, False, 0.004, 1e-4),
}


def fake_metrics(n: int = 12) -> tuple[list[str], dict[str, Any], dict[str, Any], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """perf/score dicts shaped like generate.py/score.py output, one skipped technique, and generation rows."""
    rng = np.random.default_rng(0)
    perfs, scores, gens = {}, {}, {}
    model = {"name": "smollm2-135m", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf": "x.gguf", "sha256": "ab" * 32, "params": 134_515_008, "dtype": "float32"}
    for name, (p50, rl, lo, hi, rss, wmb, same, p, p_ni) in FAKE.items():
        lat = p50 * rng.lognormal(0, 0.15, n)
        cfg = {"reference": "baseline", "generate": {"use_cache": name != "baseline"}}
        perfs[name] = {"technique": name, "config": cfg, "env": ENV, "device": "cpu", "model": model, "weight_mb": wmb, "samples": n,
                       "latency_s_mean": float(lat.mean()), "latency_s_p50": p50, "latency_s_p90": float(np.percentile(lat, 90)),
                       "latency_s_p99": float(np.percentile(lat, 99)), "ttft_s_p50": p50 / 8, "tpot_s_p50": p50 / 12,
                       "samples_per_s": 1 / float(lat.mean()), "tokens_per_s": 12 / float(lat.mean()), "peak_rss_mb": rss,
                       "latency_s_max": float(lat.max()), "latency_count": n, "new_tokens_mean": 12.0, "repeats": 2, "tokens_per_s_spread": 0.04}
        d = (lo + hi) / 2
        scores[name] = {"technique": name, "fidelity_reference": "baseline", "samples": n, "rouge1": rl + 0.03, "rouge2": rl / 3, "rougeL": rl,
                        "rougeLsum": rl + 0.001, "rougeL_low": rl - 0.05, "rougeL_high": rl + 0.05, "rougeL_delta": d, "rougeL_delta_low": lo,
                        "rougeL_delta_high": hi, "rougeL_significant": lo > 0 or hi < 0, "baseline_identical": 1.0 if same else 0.25,
                        "fidelity": 1.0 if same else 0.25, "identical": n if same else 3, "compared": n, "rougeL_delta_p": p,
                        "rougeL_delta_p_noninferior": p_ni, "rougeL_delta_sd": 0.05, "rougeL_delta_rows": n, "noninferiority_margin": 0.00262,
                        "margin_share": 0.01, "rougeL_baseline": 0.262, "rows": n, "confidence": 0.95, "seed": 7, "bootstrap_samples": 2000,
                        "lossless": name == "kv_cache", "token_check": {"basis": "token_ids", "compared": n, "identical": n if same else 3,
                                                                        "near_tie": 0 if same else 8, "real_difference": 0 if same else 1,
                                                                        "unclassified": 0, "rule": "near-tie: fake rule", "differing": []},
                        "first_difference": None if same else {"id": "s002", "prediction": f"{name} headline | two", "reference_prediction": "Base headline"}}
        gens[name] = [{"id": f"s{i:03d}", "summary": f"Summary {i} of a story.", "reference": f"Reference {i}", "prediction": f"{name} says {i}",
                       "latency_s": float(x), "new_tokens": 12} for i, x in enumerate(lat)]
    perfs["tensor_parallel"] = {"technique": "tensor_parallel", "config": {"device_map": "auto", "reference": "kv_cache"}, "env": ENV, "device": "cpu",
                                "skipped": "device_map='auto' splits layers across GPUs; this machine has 0 GPU(s)"}
    scores["tensor_parallel"] = {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    prepare = {"source": "data/sample/news_sample.jsonl", "rows_read": 48, "dropped_empty": 0, "rows_valid": 48, "rows_sampled": n}
    return [*FAKE, "tensor_parallel"], perfs, scores, prepare, gens


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "kv_cache", 3, 0.01, 2.0)
    return tmp_path


def test_report_md_has_table_rows_skips_and_sections(built: Path) -> None:
    md = (built / "metrics/report.md").read_text()
    for name in FAKE:
        assert f"| {name} | " in md
    assert "| tensor_parallel | skipped: device_map='auto' splits layers across GPUs" in md
    for section in ("## What changed: kv_cache vs baseline", "## Results", "## Lossless check", "## Sample headlines", "## Recommendations", "## Charts"):
        assert section in md
    assert "| Technique | Avg Latency (s) | P99 Latency (s) | Throughput (samples/s) | Max Memory (MB) | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |" in md
    assert "ΔROUGE-L vs baseline [95% CI], state" in md and "3/12 vs baseline" in md
    # Holm over quant8, prune_l1, target_only: 3 x 1e-4; 2 x 0.004; max(1 x 0.4, ...) and 3 x 1e-4; 2 x 0.3; 0.99
    assert "| prune_l1 | 12 | -0.1200 [-0.1700, -0.0700] | 0.0026 | 0.0003 | 0.9900 | **worse** |" in md
    assert "| quant8 | 12 | -0.0090 [-0.0300, +0.0120] | 0.0026 | 0.4000 | 0.6000 | **inconclusive** |" in md
    assert "(2000 resamples, score.seed 7)" in md
    assert "| target_only | 12 | +0.0425 [+0.0040, +0.0810] | 0.0026 | 0.0080 | 0.0003 | **non-inferior** (significantly above baseline) |" in md
    assert "Not eligible: quant8: inconclusive at n=12 (~" in md and "; prune_l1: worse." in md
    assert "| kv_cache | baseline | 12 | 12 | 0 | 0 | 0 | 12/12 |" in md  # lossless by token ids
    assert "max " in md and "(n=12)" in md and "numpy linear interpolation" in md  # no "P99" of 12 samples
    assert "| 1 x 2 | " in md and "4.0%" in md  # processes x passes and run-to-run spread
    assert "multi-GPU: none** (none: this machine has 0 GPU(s)" in md
    assert "![Latency vs ROUGE-L](plots/pareto.png)" in md
    assert "sha256 " + "ab" * 32 in md


def test_focus_json_has_agnostic_keys_and_summary_is_keyed_by_technique(built: Path) -> None:
    focus = json.loads((built / "metrics/focus.json").read_text())
    assert set(focus) == {"technique", *report.FOCUS_KEYS}
    assert focus["technique"] == "kv_cache" and focus["latency_s_p50"] == 0.46 and focus["peak_memory_mb"] == 1230.0
    summary = json.loads((built / "metrics/summary.json").read_text())
    assert list(summary["techniques"]) == [*FAKE, "tensor_parallel"]
    assert summary["techniques"]["tensor_parallel"]["skipped"].startswith("device_map")
    assert summary["env"]["torch"] == "2.13.0"
    assert {r["scenario"] for r in summary["recommendations"]} == {"low latency", "memory-constrained", "multi-GPU", "highest quality", "balanced"}
    quant8 = summary["techniques"]["quant8"]
    assert quant8["quality_state"] == "inconclusive" and quant8["usd_per_million_headlines"] == pytest.approx(2.0 / 3600 / quant8["samples_per_s"] * 1e6)
    assert quant8["latency_ratio_vs_kv_cache_low"] <= quant8["latency_ratio_vs_kv_cache"] <= quant8["latency_ratio_vs_kv_cache_high"]
    assert summary["confidence"] == 0.95 and summary["quality_comparisons"] == ["quant8", "prune_l1", "target_only"]


def test_pngs_and_plot_data_are_written(built: Path) -> None:
    for name in ("pareto.png", "memory.png", "latency_cdf.png"):
        data = (built / "metrics/plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    pareto = json.loads((built / "metrics/plots/pareto.json").read_text())["points"]
    assert {p["technique"] for p in pareto if p["pareto_front"]} == {"kv_cache", "target_only", "prune_l1"}
    cdf = json.loads((built / "metrics/plots/latency_cdf.json").read_text())["cdf"]
    assert len(cdf) == 12 * len(FAKE) and max(p["share"] for p in cdf) == 1.0
    memory = json.loads((built / "metrics/plots/memory.json").read_text())["memory"]
    assert len(memory) == 2 * len(FAKE)


def test_skipped_focus_writes_only_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "tensor_parallel", 3, 0.01)
    assert json.loads((tmp_path / "metrics/focus.json").read_text()) == {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    assert "**tensor_parallel** was skipped on this machine" in (tmp_path / "metrics/report.md").read_text()


def test_baseline_focus_has_no_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "baseline", 3, 0.01)
    assert "What changed" not in (tmp_path / "metrics/report.md").read_text()
