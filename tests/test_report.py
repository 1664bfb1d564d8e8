"""The report stage end to end on fabricated metrics: files, table rows, skipped rows, focus keys, PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import report

ENV = {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0", "cpu": "Fake CPU", "cpu_count": 2, "torch_threads": 2,
       "device": "cpu (Fake CPU, 2 cores)", "gpu_count": 0}
# name: (p50 latency s, ROUGE-L, delta CI low, delta CI high, peak RSS MB, weight MB, identical to baseline?)
FAKE = {
    "baseline": (1.60, 0.262, 0.0, 0.0, 1210.0, 513.0, True),
    "kv_cache": (0.46, 0.262, 0.0, 0.0, 1230.0, 513.0, True),
    "quant8": (0.71, 0.255, -0.030, 0.012, 820.0, 172.0, False),
    "prune_l1": (0.44, 0.141, -0.170, -0.070, 1215.0, 513.0, False),
    "target_only": (0.93, 0.301, -0.005, 0.081, 1650.0, 1030.0, False),
}


def fake_metrics(n: int = 12) -> tuple[list[str], dict[str, Any], dict[str, Any], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """perf/score dicts shaped like generate.py/score.py output, one skipped technique, and generation rows."""
    rng = np.random.default_rng(0)
    perfs, scores, gens = {}, {}, {}
    model = {"name": "smollm2-135m", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf": "x.gguf", "sha256": "ab" * 32, "params": 134_515_008, "dtype": "float32"}
    for name, (p50, rl, lo, hi, rss, wmb, same) in FAKE.items():
        lat = p50 * rng.lognormal(0, 0.15, n)
        cfg = {"reference": "baseline", "generate": {"use_cache": name != "baseline"}}
        perfs[name] = {"technique": name, "config": cfg, "env": ENV, "device": "cpu", "model": model, "weight_mb": wmb, "samples": n,
                       "latency_s_mean": float(lat.mean()), "latency_s_p50": p50, "latency_s_p90": float(np.percentile(lat, 90)),
                       "latency_s_p99": float(np.percentile(lat, 99)), "ttft_s_p50": p50 / 8, "tpot_s_p50": p50 / 12,
                       "samples_per_s": 1 / float(lat.mean()), "tokens_per_s": 12 / float(lat.mean()), "peak_rss_mb": rss}
        d = (lo + hi) / 2
        scores[name] = {"technique": name, "fidelity_reference": "baseline", "samples": n, "rouge1": rl + 0.03, "rouge2": rl / 3, "rougeL": rl,
                        "rougeLsum": rl + 0.001, "rougeL_low": rl - 0.05, "rougeL_high": rl + 0.05, "rougeL_delta": d, "rougeL_delta_low": lo,
                        "rougeL_delta_high": hi, "rougeL_significant": lo > 0 or hi < 0, "baseline_identical": 1.0 if same else 0.25,
                        "fidelity": 1.0 if same else 0.25, "identical": n if same else 3, "compared": n,
                        "first_difference": None if same else {"id": "s002", "prediction": f"{name} headline | two", "reference_prediction": "Base headline"}}
        gens[name] = [{"id": f"s{i:03d}", "summary": f"Summary {i} of a story.", "reference": f"Reference {i}", "prediction": f"{name} says {i}",
                       "latency_s": float(x)} for i, x in enumerate(lat)]
    perfs["tensor_parallel"] = {"technique": "tensor_parallel", "config": {"device_map": "auto", "reference": "kv_cache"}, "env": ENV, "device": "cpu",
                                "skipped": "device_map='auto' splits layers across GPUs; this machine has 0 GPU(s)"}
    scores["tensor_parallel"] = {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    prepare = {"source": "data/sample/news_sample.jsonl", "rows_read": 48, "dropped_empty": 0, "rows_valid": 48, "rows_sampled": n}
    return [*FAKE, "tensor_parallel"], perfs, scores, prepare, gens


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "kv_cache", 3, 0.01, 0.95)
    return tmp_path


def test_report_md_has_table_rows_skips_and_sections(built: Path) -> None:
    md = (built / "metrics/report.md").read_text()
    for name in FAKE:
        assert f"| {name} | " in md
    assert "| tensor_parallel | skipped: device_map='auto' splits layers across GPUs" in md
    for section in ("## What changed: kv_cache vs baseline", "## Results", "## Lossless check", "## Sample headlines", "## Recommendations", "## Charts"):
        assert section in md
    assert "| Technique | Avg Latency (s) | P99 Latency (s) | Throughput (samples/s) | Max Memory (MB) | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |" in md
    assert "no significant difference" in md and "significantly worse" in md and "ΔROUGE-L vs baseline [95% CI]" in md
    assert "3/12 vs baseline" in md and "9/12 headlines differ from baseline; first on `s002`" in md
    assert "prune_l1 headline \\| two" in md  # pipes inside cells are escaped
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
    report.report(names, perfs, scores, prepare, gens, "tensor_parallel", 3, 0.01, 0.95)
    assert json.loads((tmp_path / "metrics/focus.json").read_text()) == {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    assert "**tensor_parallel** was skipped on this machine" in (tmp_path / "metrics/report.md").read_text()


def test_baseline_focus_has_no_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "baseline", 3, 0.01, 0.95)
    assert "What changed" not in (tmp_path / "metrics/report.md").read_text()
