"""One table across machines: two runs with different environment fingerprints shared through a bare git remote as a
DVC experiment (`dvc exp save/push/pull`), then compared by revision and experiment name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from headline_bench.analysis.machines import columns, speed
from headline_bench.compare import compare, experiments, main
from headline_bench.errors import InputError
from headline_bench.measure.records import Perf, assemble
from headline_bench.quality.records import Score

ZEN3 = {"host": "vm", "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "cpu": "AMD EPYC",
        "cpu_id": "AuthenticAMD family 25 model 1 stepping 1", "cpu_isa": "avx2 fma f16c", "cpu_count": 2, "torch_threads": 2,
        "omp_num_threads": None, "device": "cpu (AMD EPYC, 2 cores)", "gpu_count": 0}
SAPPHIRE = ZEN3 | {"host": "other-vm", "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu_id": "GenuineIntel family 6 model 143 stepping 8",
                   "cpu_isa": "avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_int8",
                   "device": "cpu (Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores)"}
# median TPOT (s) per technique: on the Zen 3 llama.cpp wins, on the AMX machine the compiled loop does
TPOT = {"vm": {"kv_cache": 0.112, "llamacpp": 0.0141, "compiled_loop_cpu": 0.0367},
        "other-vm": {"kv_cache": 0.060, "llamacpp": 0.0089, "compiled_loop_cpu": 0.0067}}


def perf(name: str, env: dict[str, Any], tpot: float) -> dict[str, Any]:
    """A well-formed perf.json (checked against its one definition) of three timed processes, 24 tokens per row."""
    procs = [{"process": k, "tokens_per_s": 1 / (tpot * f), "tpot_s_p50": tpot * f, "tpot_s_mean": tpot * f * 1.01} for k, f in enumerate((0.98, 1.0, 1.02), 1)]
    engine = "llama-cpp-python 0.3.16" if name == "llamacpp" else f"transformers {env['transformers']}"
    return assemble(Perf, {"technique": name, "env": env | {"engine": engine}, "device": "cpu", "samples": 8, "tpot_s_p50": tpot,
                           "tpot_s_mean": tpot * 1.01, "tpot_s_stdev": tpot * 0.05, "tpot_count": 24, "tokens_per_s": 1 / tpot,
                           "peak_rss_mb": 900.0 + tpot, "processes": procs, "process_count": 3})


def write_run(repo: Path, env: dict[str, Any]) -> None:
    for name, tpot in TPOT[env["host"]].items():
        folder = repo / "metrics" / "techniques" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "perf.json").write_text(json.dumps(perf(name, env, tpot)))
        state = "reference" if name == "kv_cache" else "inconclusive"
        (folder / "score.json").write_text(json.dumps(assemble(Score, {"technique": name, "quality_state": state, "rougeL": 0.1})))
    skipped = repo / "metrics" / "techniques" / "vllm"
    skipped.mkdir(parents=True, exist_ok=True)
    (skipped / "perf.json").write_text(json.dumps({"technique": "vllm", "skipped": "vLLM needs a CUDA GPU; this machine has none"}))


def sh(cwd: Path, *argv: str) -> str:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr}"
    return out.stdout


@pytest.fixture()
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Machine A's repository after `dvc exp pull` of machine B's run: A's run committed, B's as experiment `machine-b`."""
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                       "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    dvc = str(Path(sys.executable).with_name("dvc"))
    origin, a, b = tmp_path / "origin.git", tmp_path / "a", tmp_path / "b"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(tmp_path, "git", "init", "-q", "-b", "main", str(a))
    sh(a, dvc, "init", "-q")
    write_run(a, ZEN3)
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "run on machine A")
    sh(a, "git", "remote", "add", "origin", str(origin))
    sh(a, "git", "push", "-q", "origin", "main")
    sh(tmp_path, "git", "clone", "-q", str(origin), str(b))  # machine B: the same project, its own run
    write_run(b, SAPPHIRE)
    sh(b, dvc, "exp", "save", "-n", "machine-b")
    sh(b, dvc, "exp", "push", "origin", "machine-b")
    sh(a, dvc, "exp", "pull", "origin", "machine-b")
    return a


def test_two_machines_shared_as_a_dvc_experiment_are_two_columns(shared: Path, tmp_path: Path) -> None:
    assert experiments(shared) == ["machine-b"]
    result = compare(shared, ["HEAD", "machine-b"], ["kv_cache", "llamacpp"], tmp_path / "out")
    cols = result["columns"]
    assert [c["source"] for c in cols] == ["HEAD", "machine-b"]
    assert "AMD EPYC (family/model 25/1, AVX2)" in cols[0]["title"] and "family/model 6/143, AMX" in cols[1]["title"]
    zen, amx = (c["cells"] for c in cols)
    assert zen["compiled_loop_cpu"]["vs_llamacpp"]["ratio"] == pytest.approx(0.0367 / 0.0141)  # slower than llama.cpp on the Zen 3
    assert amx["compiled_loop_cpu"]["vs_llamacpp"]["ratio"] == pytest.approx(0.0067 / 0.0089)  # faster on the AMX machine
    assert amx["kv_cache"]["vs_kv_cache"]["ratio"] == 1 and zen["vllm"] == {"outcome": "skipped", "reason": "vLLM needs a CUDA GPU; this machine has none"}
    assert zen["llamacpp"]["tpot_ms_low"] < 14.1 < zen["llamacpp"]["tpot_ms_high"] and zen["llamacpp"]["tpot_basis"] == "median; t interval over 3 timed processes"
    assert amx["kv_cache"]["quality_state"] == "reference" and amx["kv_cache"]["peak_kind"] == "peak RSS"
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| technique | M1 | M2 |" in md and "| compiled_loop_cpu | 36.70 [" in md and "| compiled_loop_cpu | 0.33 / 2.60 | 0.11 / 0.75 |" in md
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["sources"] == ["HEAD", "machine-b"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_the_command_takes_every_experiment_and_the_workspace(shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shared)
    main(["--rev", "workspace", "--all-experiments", "--out", str(tmp_path / "cli")])
    result = json.loads((tmp_path / "cli" / "comparison.json").read_text())
    assert [c["source"] for c in result["columns"]] == ["workspace", "machine-b"]
    with pytest.raises(SystemExit, match="neither a git revision nor a DVC experiment"):
        main(["--rev", "no-such-run", "--out", str(tmp_path / "cli")])


def test_same_machine_in_two_sources_is_told_apart_by_source() -> None:
    run = {"kv_cache": {"perf": perf("kv_cache", ZEN3, 0.1), "score": {}}}
    cols = columns({"HEAD~1": run, "HEAD": run}, ["kv_cache"])
    assert [c["title"].rsplit(" @ ", 1)[1] for c in cols] == ["HEAD~1", "HEAD"]


def test_interval_without_per_process_values_says_it_covers_rows_only() -> None:
    p = perf("kv_cache", ZEN3, 0.1)
    p["processes"] = [{"tokens_per_s": 10.0}]  # a run from before per-process TPOTs were kept, one process
    s = speed(p)
    assert s["tpot_ms_low"] is None and s["tpot_basis"] == "median; no per-process values: no interval"
    assert s["tpot_mean_ms_low"] < 101 < s["tpot_mean_ms_high"] and "rows only" in s["tpot_mean_basis"]
    assert s["tokens_per_s_low"] is None


def test_a_revision_without_metrics_is_an_input_error(tmp_path: Path) -> None:
    from headline_bench.compare import read_source

    with pytest.raises(InputError, match="no metrics/techniques"):
        read_source(tmp_path, "workspace")


def test_a_source_where_nothing_ran_still_gets_its_column() -> None:
    run = {"vllm": {"perf": {"technique": "vllm", "skipped": "vLLM needs a CUDA GPU"}, "score": {}}}
    (col,) = columns({"HEAD": run}, ["kv_cache"])
    assert col["title"].startswith("machine not recorded") and col["cells"]["vllm"]["outcome"] == "skipped"
