"""The GPU check's planner: skips written in-process (no subprocess per skipped technique) and a clean-state order."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from headline_bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_planner_writes_skips_without_a_subprocess(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_process(*a: object, **k: object) -> None:
        raise AssertionError("the planner started a process")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(model="tiny", target="tiny", device="cpu")
    wanted = ["quant4", "prune_l1", "compiled_loop", "vllm", "kv_cache", "layer_split_balanced", "static_compile", "baseline"]
    params["techniques"] = {name: params["techniques"][name] for name in wanted}
    params["techniques"]["cuda_only"] = {"only_on": "cuda"}
    params["techniques"]["static_compile"].pop("only_on")  # cuda in params.yaml: here a technique the planner runs on this CPU
    params["techniques"]["layer_split_balanced"].pop("reference")  # its reference does not run in this pass (as pass_params does)
    params["models"]["tiny"] = {"path": str(models_dir / "tiny")}
    params.pop("serving")
    work = tmp_path / "work"
    work.mkdir()
    run, skips = gpu_check.plan(params, work)
    assert run == ["kv_cache", "baseline", "compiled_loop", "static_compile", "prune_l1", "quant4"]
    assert set(skips) == {"vllm", "layer_split_balanced", "cuda_only"}
    for name, reason in skips.items():
        perf = json.loads((work / "metrics" / "techniques" / name / "perf.json").read_text())
        assert perf["skipped"] == reason and perf["device"] == "cpu"
        assert (work / "data" / "generations" / f"{name}.jsonl").read_text() == ""
    assert not (work / "metrics" / "techniques" / "kv_cache").exists()  # run ones are the worker's to write
    assert Path.cwd() != work


def test_pass_keys_are_not_params_overlays() -> None:
    spec = yaml.safe_load((ROOT / "src" / "headline_bench" / "gpu_check.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, entry in spec["passes"].items():
        overlay = {k: v for k, v in entry.items() if k not in gpu_check.PASS_KEYS}
        out = gpu_check.pass_params(params, spec["common"], overlay, None)
        assert set(out) == set(params), name
        assert set(entry.get("row_caps") or {}) <= set(out["techniques"]), name
        assert entry.get("solo_check") in (None, *out["techniques"]), name


def test_bench_decode_summary_pairs_rows_and_gives_intervals() -> None:
    """scripts/bench-decode's numbers: rows both techniques timed, tokens/s = tokens / seconds, paired TPOT ratio."""
    from headline_bench.decode_bench import markdown, summarize

    fast = [{"id": i, "new_tokens": 10, "latency_s": 0.5 + 0.01 * i, "tpot_s": 0.02 + 0.001 * i} for i in range(6)]
    slow = [{"id": i, "new_tokens": 10, "latency_s": 1.0, "tpot_s": 0.04 + 0.002 * i} for i in range(5)]  # row 5 missing
    slow.append({"id": 5, "new_tokens": 0, "latency_s": 1.0, "tpot_s": None})
    out = summarize({"compiled_loop_cpu": fast, "llamacpp": slow}, samples=2000)
    assert out["rows"] == 5
    tps = out["techniques"]["compiled_loop_cpu"]["tokens_per_s"]
    assert tps[0] == pytest.approx(50 / sum(0.5 + 0.01 * i for i in range(5))) and tps[1] <= tps[0] <= tps[2]
    ratio = out["tpot_ratio"]["ratio"]
    assert ratio[0] == pytest.approx(0.5) and ratio[1] <= 0.5 <= ratio[2]
    text = markdown(out, {"command": "scripts/bench-decode --rows 5"})
    assert "| llamacpp |" in text and "TPOT ratio compiled_loop_cpu / llamacpp: 0.500" in text


def test_bench_decode_rounds_average_each_row_and_keep_every_round() -> None:
    """Alternating rounds: a row's TPOT is its mean over the rounds, each round's mean is shown, a row whose ids
    changed between rounds is counted, and a row one round did not time is left out of that row's mean."""
    from headline_bench.decode_bench import markdown, mean_over_rounds, summarize

    def rows(tpot: float, ids: list[int]) -> list[dict[str, Any]]:
        return [{"id": i, "new_tokens": 4, "latency_s": 4 * tpot, "ttft_s": tpot, "tpot_s": tpot, "token_ids": ids} for i in range(3)]

    loop = mean_over_rounds([rows(0.010, [1, 2]), rows(0.012, [1, 2]), rows(0.014, [1, 3])])
    assert [r["tpot_s"] for r in loop] == pytest.approx([0.012] * 3) and loop[0]["tpot_s_rounds"] == [0.010, 0.012, 0.014]
    engine = mean_over_rounds([rows(0.010, [5]), rows(0.010, [5])[:2] + [{"id": 2, "tpot_s": None}], rows(0.013, [5])])
    assert engine[2]["tpot_s_rounds"] == [0.010, None, 0.013] and engine[0]["tpot_s"] == pytest.approx(0.011)
    out = summarize({"compiled_loop_cpu": loop, "llamacpp": engine}, samples=500)
    assert out["techniques"]["compiled_loop_cpu"]["tpot_s_per_round"] == pytest.approx([0.010, 0.012, 0.014])
    assert out["techniques"]["compiled_loop_cpu"]["rows_ids_differ_across_rounds"] == 3
    assert out["techniques"]["llamacpp"]["rows_ids_differ_across_rounds"] == 0
    assert out["tpot_ratio"]["per_round"] == pytest.approx([1.0, 1.2, 14 / 13])
    text = markdown(out, {"command": "x", "rounds": 3})
    assert "| 10.00, 12.00, 14.00 |" in text and "1.000, 1.200, 1.077" in text


SPEC = {
    "default_cost_s": 30,
    "passes": {
        "small": {"techniques": ["kv_cache", "static_compile", "compiled_loop", "baseline", "quant4"], "setup_s": 50,
                  "costs": {"kv_cache": 10, "static_compile": 40, "compiled_loop": 45, "baseline": 15, "quant4": 20}},
        "large": {"techniques": ["kv_cache", "static_compile", "compiled_loop", "baseline", "batched"], "setup_s": 10,
                  "costs": {"kv_cache": 20, "static_compile": 50, "compiled_loop": 60, "baseline": 25}},
        "real": {"techniques": ["baseline", "compiled_loop"], "needs": "no_such_package", "setup_s": 80},
    },
}
PARAMS = {"techniques": {"kv_cache": {"reference": "baseline"}, "static_compile": {"reference": "baseline"},
                         "compiled_loop": {"reference": "baseline"}, "baseline": {}, "quant4": {}, "batched": {"reference": "baseline"}}}


def test_plan_puts_asked_techniques_and_their_references_first_and_fits_the_budget() -> None:
    """Asked (--redo) techniques in every pass first, with the reference their token check needs; then what this
    card has not measured; a pass's setup paid once; what does not fit is left out with its reason; a pass whose
    package is missing is left out whole."""
    measured = {"small": {"kv_cache", "static_compile", "baseline", "quant4"}, "large": {"kv_cache", "static_compile", "baseline"}}
    plan = gpu_check.plan_passes(SPEC, PARAMS, 300, measured, {"static_compile", "compiled_loop"}, lambda pkg: False)
    # tier 0: small 50 + 40 + 15 + 45 = 150, large 10 + 50 + 25 + 60 = 145 (295); tier 1: batched 30 > 5 left
    assert plan.runs == {"small": ["static_compile", "compiled_loop", "baseline"], "large": ["static_compile", "compiled_loop", "baseline"]}
    assert plan.seconds == {"small": 150, "large": 145} and sum(plan.seconds.values()) <= 300
    assert plan.left_out["small"] == {"kv_cache": "already measured on this card (--redo to measure it again)",
                                      "quant4": "already measured on this card (--redo to measure it again)"}
    assert plan.left_out["large"]["batched"].startswith("over the budget: ~30 s planned, 5 s of 300 left")
    assert set(plan.left_out["real"]) == {"baseline", "compiled_loop"} and "no_such_package" in plan.left_out["real"]["baseline"]
    everything = gpu_check.plan_passes(SPEC, PARAMS, 10_000, {}, set(), lambda pkg: True)
    assert everything.runs == {n: e["techniques"] for n, e in SPEC["passes"].items()}
    assert not any(everything.left_out.values())
    tight = gpu_check.plan_passes(SPEC, PARAMS, 100, {}, set(), lambda pkg: True)
    assert tight.runs == {"small": ["kv_cache", "baseline", "quant4"]} and sum(tight.seconds.values()) == 95


def test_shipped_plan_fits_eight_minutes_with_the_loops_on_both_models() -> None:
    """gpu_check.yaml as shipped, this repo's H200 results, --redo compiled_loop,static_compile and the default budget:
    both loops (and the baseline their token check needs) on 1B and 8B, within the budget; smollm2 left out without
    its package; a new card (no results) still fits."""
    spec = yaml.safe_load((ROOT / "src" / "headline_bench" / "gpu_check.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budget = gpu_check.parser().get_default("budget_s")
    assert budget + 150 <= 480  # machine start, wheel install and the trip back in what is left of 8 minutes
    out = ROOT / "metrics" / "gpu" / "nvidia-h200"
    measured = {name: gpu_check.measured_on(out, name) for name in spec["passes"]}
    assert {"kv_cache", "static_compile", "baseline"} <= measured["llama-3.1-8b"] and "compiled_loop" not in measured["llama-3.1-8b"]
    for done in (measured, {}):
        plan = gpu_check.plan_passes(spec, params, budget, done, {"compiled_loop", "static_compile"}, lambda pkg: False)
        assert sum(plan.seconds.values()) <= budget
        for name in ("llama-3.2-1b", "llama-3.1-8b"):
            assert {"compiled_loop", "static_compile", "baseline"} <= set(plan.runs[name]), (name, plan.left_out)
        assert "smollm2" not in plan.runs


def test_export_packs_results_without_weights_or_links(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "models" / "m").mkdir(parents=True)
    (work / "models" / "m" / "config.json").write_text("{}")
    (work / "models" / "m" / "model.safetensors").write_bytes(b"x" * 1000)
    (work / "p" / "metrics" / "techniques" / "kv_cache").mkdir(parents=True)
    (work / "p" / "metrics" / "techniques" / "kv_cache" / "perf.json").write_text("{}")
    gpu_check.link_models(work / "p", work / "models")
    (work / "p" / ".gpu-check").mkdir()
    (work / "p" / ".gpu-check" / "done").write_text("kv_cache")
    gpu_check.export(work, tmp_path / "out" / "w.tar.gz")
    import tarfile

    with tarfile.open(tmp_path / "out" / "w.tar.gz") as tar:
        names = sorted(n for n in tar.getnames() if tar.getmember(n).isfile())
    assert names == ["./models/m/config.json", "./p/metrics/techniques/kv_cache/perf.json"]


def test_a_later_run_reports_beside_the_earlier_one(tmp_path: Path) -> None:
    assert gpu_check.destination(tmp_path, "p", "2026-12-06T0100Z") == tmp_path / "p"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "summary.json").write_text('{"techniques": {"kv_cache": {"tokens_per_s": 1}, "vllm": {"skipped": "no"}}}')
    assert gpu_check.destination(tmp_path, "p", "2026-12-06T0100Z") == tmp_path / "p" / "2026-12-06T0100Z"
    (tmp_path / "p" / "run.json").write_text('{"started": "2026-12-06T0100Z"}')
    assert gpu_check.destination(tmp_path, "p", "2026-12-06T0100Z") == tmp_path / "p"  # the same run reported again
    assert gpu_check.measured_on(tmp_path, "p") == {"kv_cache"}


def test_scratch_under_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device tool returns what is under $OUT: model builds and caches must stay in scratch elsewhere."""
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit, match=r"is under \$OUT"):
        gpu_check.main(["--work", str(tmp_path / "work"), "--phase", "generate"])
    assert not (tmp_path / "work").exists()
