"""The report stage end to end on fabricated metrics: files, table rows, skipped rows, focus keys, PNGs; every printed state
follows from the interval printed beside it, in report.md and summary.json alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headline_bench.analysis.verdicts import compare, decide
from headline_bench.render import report
from headline_bench.settings import Report, Score

SCORE = {"confidence": 0.95, "margin": 0.01, "min_rows": 30, "power": 0.8, "family": ["quant8", "prune_l1", "quant4", "vllm"],
         "model_comparisons": ["target_only"]}
REPORT = {"sample_headlines": 3, "balanced_rougeL_within": 0.01, "usd_per_hour": 2.0, "memory_tie_share": 0.02, "speed_tie": 0.05}

ENV = {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.24.0", "cpu": "Fake CPU", "cpu_count": 2, "torch_threads": 2,
       "device": "cpu (Fake CPU, 2 cores)", "gpu_count": 0}
# name: (p50 latency s, ROUGE-L, mean Δ, sd of Δ, peak RSS MB, weight MB, identical to baseline?)
FAKE = {
    "baseline": (1.60, 0.262, 0.0, 0.0, 1210.0, 513.0, True),
    "kv_cache": (0.46, 0.262, 0.0, 0.0, 1230.0, 513.0, True),
    "quant8": (0.71, 0.255, -0.007, 0.08, 820.0, 172.0, False),
    "prune_l1": (0.44, 0.141, -0.12, 0.08, 1215.0, 513.0, False),
    "target_only": (0.93, 0.301, 0.04, 0.03, 1650.0, 1030.0, False),
}


def fake_metrics(n: int = 40) -> tuple[list[str], dict[str, Any], dict[str, Any], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """perf/score dicts shaped like generate.py/score.py output, one skipped technique, and generation rows."""
    rng = np.random.default_rng(0)
    perfs, scores, gens = {}, {}, {}
    model = {"name": "smollm2-135m", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf": "x.gguf", "sha256": "ab" * 32, "params": 134_515_008, "dtype": "float32"}
    for name, (p50, rl, mean, sd, rss, wmb, same) in FAKE.items():
        lat = p50 * rng.lognormal(0, 0.15, n)
        if name == "baseline":
            state = {"quality_state": "reference", "quality_basis": "the reference"}
        elif name == "kv_cache":
            state = {"quality_state": "equivalent", "quality_basis": f"equivalent to baseline up to float32 numerics ({n} identical + 0 near-tie)",
                     "quality_reference": "baseline", "rougeL_delta": 0.0}
        else:
            family = ("model comparison", 1) if name == "target_only" else ("lossy", 4)
            state = compare(list(rng.normal(mean, sd, n)), *family, Score(**SCORE)) | {"quality_basis": "paired t", "rougeL_delta_vs": "baseline",
                                                                              "quality_reference": "baseline"}
        cfg = {"reference": "baseline", "generate": {"use_cache": name != "baseline"}}
        perfs[name] = {"technique": name, "config": cfg, "env": ENV, "device": "cpu", "model": model, "weight_mb": wmb, "samples": n,
                       "latency_s_mean": float(lat.mean()), "latency_s_p50": p50, "latency_s_p90": float(np.percentile(lat, 90)),
                       "latency_s_p99": float(np.percentile(lat, 99)), "ttft_s_p50": p50 / 8, "tpot_s_p50": p50 / 12,
                       "samples_per_s": 1 / float(lat.mean()), "tokens_per_s": 12 / float(lat.mean()), "peak_rss_mb": rss,
                       "latency_s_max": float(lat.max()), "latency_count": n, "new_tokens_mean": 12.0, "repeats": 2, "tokens_per_s_spread": 0.04}
        scores[name] = state | {"technique": name, "fidelity_reference": "baseline", "samples": n, "rouge1": rl + 0.03, "rouge2": rl / 3, "rougeL": rl,
                        "rougeLsum": rl + 0.001, "rougeL_low": rl - 0.05, "rougeL_high": rl + 0.05, "baseline_identical": 1.0 if same else 0.25,
                        "fidelity": 1.0 if same else 0.25, "identical": n if same else 3, "compared": n, "mlperf_99": rl >= 0.99 * 0.262,
                        "rougeL_baseline": 0.262, "rows": n, "confidence": 0.95, "seed": 7, "bootstrap_samples": 2000,
                        "lossless": name == "kv_cache", "token_check": {"basis": "token_ids", "compared": n, "identical": n if same else 3,
                                                                        "near_tie": 0 if same else 8, "real_difference": 0 if same else 1,
                                                                        "unclassified": 0, "rule": "near-tie: fake rule", "differing": []},
                        "first_difference": None if same else {"id": "s002", "prediction": f"{name} headline | two", "reference_prediction": "Base headline"}}
        procs = rng.lognormal(0, 0.01, (3, n)) * lat  # three timed processes of one pass each
        perfs[name]["passes"] = [{"process": k} for k in range(3)]
        gens[name] = [{"id": f"s{i:03d}", "summary": f"Summary {i} of a story.", "reference": f"Reference {i}", "prediction": f"{name} says {i}",
                       "latency_s": float(procs[:, i].mean()), "latency_s_passes": [float(v) for v in procs[:, i]], "new_tokens": 12}
                      for i in range(n)]
    perfs["tensor_parallel"] = {"technique": "tensor_parallel", "config": {"device_map": "auto", "reference": "kv_cache"}, "env": ENV, "device": "cpu",
                                "skipped": "device_map='auto' splits layers across GPUs; this machine has 0 GPU(s)"}
    scores["tensor_parallel"] = {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    prepare = {"source": "data/sample/news_sample.jsonl", "rows_read": 48, "dropped_empty": 0, "rows_valid": 48, "rows_sampled": n}
    return [*FAKE, "tensor_parallel"], perfs, scores, prepare, gens


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "kv_cache", Report(**REPORT), Score(**SCORE))
    return tmp_path


def test_report_md_has_table_rows_skips_and_sections(built: Path) -> None:
    md = (built / "metrics/report.md").read_text()
    for name in FAKE:
        assert f"| {name} | " in md
    assert "| tensor_parallel | skipped: device_map='auto' splits layers across GPUs" in md
    for section in ("## What changed: kv_cache vs baseline", "## Results", "## Lossless check", "## Sample headlines", "## Recommendations", "## Charts"):
        assert section in md
    assert "| Technique | Avg Latency (s) | P99 Latency (s) | Throughput (samples/s) | Max Memory (MB) | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |" in md
    assert "ΔROUGE-L vs baseline [simultaneous interval], state" in md and "3/40 vs baseline" in md  # the interval that decided the state, not a 95% one
    assert "lossy (score.family, k = 4: quant8, prune_l1, quant4, vllm; not run here but counted: quant4, vllm)" in md
    assert "| prune_l1 | lossy (k=4) | 40 |" in md and "**worse**" in md and "| 0.9875 |" in md
    assert "| target_only | model comparison (k=1) | 40 |" in md and "| 0.9500 |" in md
    assert "| kv_cache | — (lossless) | 40 |" in md and "**equivalent** (takes baseline's: reference)" in md
    assert "| kv_cache | baseline | 40 | 40 | 0 | 0 | 0 | — | 40/40 | equivalent |" in md  # lossless by token ids
    assert "**memory-constrained: kv_cache** (1230 MB CPU peak RSS)" in md
    assert "Note: tied on memory with baseline (1210 MB); faster than the other tied ones by the ms/token ratio interval." in md
    assert "**highest quality: target_only** (ROUGE-L 0.3010)" in md
    assert "max " in md and "(n=40 of 40 prompts)" in md and "numpy linear interpolation" in md  # no "P99" of 40 samples
    assert "| 40 (40 prompts) | 3 | 2 |" in md and "4.0%" in md  # prompts, processes, passes and run-to-run spread
    assert "3 processes (paired by process) and 40 rows" in md
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
    speed = quant8["speed_vs_kv_cache"]
    assert speed["low"] <= speed["ratio"] <= speed["high"] and speed["verdict"] == "slower" and speed["processes"] == 3
    assert summary["confidence"] == 0.95 and summary["quality_families"] == {"lossy": SCORE["family"], "model comparison": ["target_only"]}


def test_every_state_follows_from_the_interval_printed_beside_it(built: Path) -> None:
    summary = json.loads((built / "metrics/summary.json").read_text())
    md = (built / "metrics/report.md").read_text()
    checked = 0
    for name, t in summary["techniques"].items():
        if t.get("quality_state") in ("non-inferior", "worse", "inconclusive", "too few rows"):
            assert t["quality_state"] == decide(t["rougeL_delta_low"], t["rougeL_delta_high"], SCORE["margin"], t["rougeL_delta_rows"], SCORE["min_rows"])[0]
            line = next(x for x in md.splitlines() if x.startswith(f"| {name} | ") and "(k=" in x)
            assert f"[{t['rougeL_delta_low']:+.4f}, {t['rougeL_delta_high']:+.4f}]" in line and f"**{t['quality_state']}**" in line
            checked += 1
    assert checked == 3


def test_pngs_and_plot_data_are_written(built: Path) -> None:
    for name in ("pareto.png", "memory.png", "latency_cdf.png"):
        data = (built / "metrics/plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    pareto = json.loads((built / "metrics/plots/pareto.json").read_text())["points"]
    assert {p["technique"] for p in pareto if p["pareto_front"]} == {"kv_cache", "target_only", "prune_l1"}
    cdf = json.loads((built / "metrics/plots/latency_cdf.json").read_text())["cdf"]
    assert len(cdf) == 40 * len(FAKE) and max(p["share"] for p in cdf) == 1.0
    memory = json.loads((built / "metrics/plots/memory.json").read_text())["memory"]
    assert len(memory) == 2 * len(FAKE)


def test_skipped_focus_writes_only_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "tensor_parallel", Report(**REPORT | {"usd_per_hour": None}), Score(**SCORE))
    assert json.loads((tmp_path / "metrics/focus.json").read_text()) == {"technique": "tensor_parallel", "skipped": perfs["tensor_parallel"]["skipped"]}
    assert "**tensor_parallel** was skipped on this machine" in (tmp_path / "metrics/report.md").read_text()


def test_baseline_focus_has_no_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    report.report(names, perfs, scores, prepare, gens, "baseline", Report(**REPORT), Score(**SCORE))
    assert "What changed" not in (tmp_path / "metrics/report.md").read_text()


def test_environments_are_listed_and_a_mix_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quant8 timed with 1 torch thread, the rest with 2, and kv_cache resumed: the header names both environments with
    their techniques, warns, and flags the resumed technique; summary.json carries the same."""
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    env = ENV | {"host": "box", "engine": "transformers 5.24.0", "omp_num_threads": None}
    for name in FAKE:
        perfs[name]["env"] = env
    perfs["quant8"]["env"] = env | {"torch_threads": 1, "omp_num_threads": "1"}
    perfs["kv_cache"]["resume"] = {"sessions": 2, "resumed_rows": 5, "resumed_ids": [], "session_envs": []}
    summary = report.report(names, perfs, scores, prepare, gens, "kv_cache", Report(sample_headlines=3, usd_per_hour=2.0), Score())
    md = (tmp_path / "metrics/report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("- Environment ")]
    assert len(lines) == 2
    assert lines[0].startswith("- Environment A: host box") and "torch threads 2" in lines[0] and lines[0].endswith("baseline, kv_cache, prune_l1, target_only")
    assert "torch threads 1, OMP_NUM_THREADS 1" in lines[1] and lines[1].endswith(": quant8")
    assert "**Warning: techniques were measured in 2 different environments (they differ in: torch_threads, omp_num_threads)" in md
    assert "**Resumed: kv_cache** (2 sessions): 5 row(s)" in md
    assert [g["techniques"] for g in summary["environments"]] == [["baseline", "kv_cache", "prune_l1", "target_only"], ["quant8"]]
    assert summary["environment_warning"] and summary["techniques"]["quant8"]["environment"] == "B"
    assert summary["techniques"]["kv_cache"]["resumed_rows"] == 5


def test_one_environment_has_no_warning(built: Path) -> None:
    md = (built / "metrics/report.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("- Environment ")]) == 1 and "Warning" not in md


def test_quality_states_name_the_machine_they_were_decided_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same code and rows gave compiled_loop_cpu "inconclusive" on a Zen 3 and "worse" on an Intel with native bf16: a state
    holds for the machine its outputs came from, and the verdicts table says which, flagging a reference from another one."""
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    zen3 = ENV | {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 1 stepping 1", "cpu_isa": "avx2 fma f16c"}
    for p in perfs.values():
        p["env"] = zen3
    perfs["quant8"]["env"] = ENV | {"cpu": "Intel Xeon", "cpu_id": "GenuineIntel family 6 model 143 stepping 8", "cpu_isa": "avx512f avx512_bf16 amx_bf16"}
    report.report(names, perfs, scores, prepare, gens, "kv_cache", Report(**REPORT), Score(**SCORE))
    md = (tmp_path / "metrics/report.md").read_text()
    line = {n: next(x for x in md.splitlines() if x.startswith(f"| {n} | ") and "(k=" in x) for n in ("quant8", "prune_l1")}
    assert ("| Intel Xeon (GenuineIntel family 6 model 143 stepping 8; avx512f avx512_bf16 amx_bf16); **reference on AMD EPYC (AuthenticAMD "
            "family 25 model 1 stepping 1; avx2 fma f16c)** |") in line["quant8"]
    assert "| AMD EPYC (AuthenticAMD family 25 model 1 stepping 1; avx2 fma f16c) |" in line["prune_l1"] and "reference on" not in line["prune_l1"]
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary["techniques"]["quant8"]["machine"].startswith("Intel Xeon (GenuineIntel")
