"""Interrupted runs resume: finished rows are checkpointed outside DVC's outputs and a rerun continues from
the first unfinished row, with predictions equal to an uninterrupted run's. Failures lose no finished outputs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_generate import BASE_PARAMS

from conftest import ROOT
from headline_bench.benchmark import generate
from headline_bench.measure import checkpoints as checkpoint

ROWS = [{"id": f"r{i}", "summary": f"the city council vote number {i} on the new budget", "reference": "council vote"} for i in range(5)]


def files() -> list[Path]:
    return sorted(checkpoint.CHECKPOINTS.glob("*.jsonl"))


@pytest.mark.parametrize(("name", "stop_after", "resumed"), [("kv_cache", 2, 2), ("batched", 3, 4)])
def test_interrupted_run_resumes_with_identical_predictions(models_dir: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                             name: str, stop_after: int, resumed: int) -> None:
    params = copy.deepcopy(BASE_PARAMS)
    full, full_perf = generate(name, copy.deepcopy(params), ROWS)
    assert files() == [] and full_perf["resume"]["sessions"] == 1 and full_perf["resume"]["resumed_rows"] == 0

    monkeypatch.setenv(checkpoint.STOP_AFTER, str(stop_after))
    with pytest.raises(KeyboardInterrupt):
        generate(name, copy.deepcopy(params), ROWS)
    (path,) = files()
    assert path.name.startswith(f"{name}-")
    monkeypatch.delenv(checkpoint.STOP_AFTER)

    records, perf = generate(name, copy.deepcopy(params), ROWS)
    assert [r["raw"] for r in records] == [r["raw"] for r in full]
    assert [r["id"] for r in records] == [r["id"] for r in full]
    assert perf["resume"]["sessions"] == 2 and perf["resume"]["resumed_rows"] == resumed
    assert perf["resume"]["resumed_ids"] == [r["id"] for r in ROWS[:resumed]]
    assert "this session" in perf["resume"]["per_session"] and perf["samples"] == 5 and perf["latency_count"] == 5
    assert files() == []  # deleted once every row is in the records


def test_a_changed_config_never_resumes_a_stale_checkpoint(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    params = copy.deepcopy(BASE_PARAMS)
    monkeypatch.setenv(checkpoint.STOP_AFTER, "2")
    with pytest.raises(KeyboardInterrupt):
        generate("kv_cache", copy.deepcopy(params), ROWS)
    monkeypatch.delenv(checkpoint.STOP_AFTER)
    params["generate"]["max_new_tokens"] = 4
    _, perf = generate("kv_cache", params, ROWS)
    assert perf["resume"]["resumed_rows"] == 0
    _, perf = generate("kv_cache", copy.deepcopy(params), ROWS[:3])  # other rows: another key too
    assert perf["resume"]["resumed_rows"] == 0


def test_a_line_cut_by_the_interruption_is_rerun(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    params = copy.deepcopy(BASE_PARAMS)
    monkeypatch.setenv(checkpoint.STOP_AFTER, "3")
    with pytest.raises(KeyboardInterrupt):
        generate("kv_cache", copy.deepcopy(params), ROWS)
    monkeypatch.delenv(checkpoint.STOP_AFTER)
    (path,) = files()
    path.write_text(path.read_text()[:-20])  # the third row's line half written
    _, perf = generate("kv_cache", copy.deepcopy(params), ROWS)
    assert perf["resume"]["resumed_rows"] == 2


def stage_repo(tmp: Path, tiny: Path, techniques: dict[str, Any]) -> dict[str, Any]:
    """A folder shaped like the repo (params.yaml, data/prepared, data/models) for running stages as DVC does."""
    shutil.copytree(tiny, tmp / "data/models/tiny")
    (tmp / "data/models/tiny/source.json").write_text('{"name": "tiny", "id": "tiny-random-llama"}')
    (tmp / "data/prepared").mkdir(parents=True)
    (tmp / "data/prepared/timed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    params = copy.deepcopy(BASE_PARAMS) | {"techniques": techniques}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def run_generate(tmp: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages/generate.py"), name], cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_stage_killed_after_k_rows_then_rerun(tiny_llama: Path, tmp_path: Path) -> None:
    """The stage as DVC runs it: interrupted after 2 rows (KeyboardInterrupt, as SIGINT raises), no outputs
    written; the rerun resumes from row 3 and writes what an uninterrupted run writes."""
    stage_repo(tmp_path, tiny_llama, {"kv_cache": {}, "kv_copy": {}})
    out = run_generate(tmp_path, "kv_cache", **{checkpoint.STOP_AFTER: "2"})
    assert out.returncode != 0 and not (tmp_path / "data/generations/kv_cache.jsonl").exists()
    assert len((tmp_path / ".cache/checkpoints").glob("kv_cache-*.jsonl").__next__().read_text().splitlines()) == 2
    rerun = run_generate(tmp_path, "kv_cache")
    assert rerun.returncode == 0
    assert not [line for line in rerun.stderr.splitlines() if "triton" in line or "pytree" in line or "Failed to load" in line]  # notices filtered
    assert rerun.stderr.count(" INFO kv_cache: 5 samples of tiny on cpu") == 1  # one line: what ran, on what, where it went
    assert run_generate(tmp_path, "kv_copy").returncode == 0  # the same settings under another name, uninterrupted
    got = [json.loads(x) for x in (tmp_path / "data/generations/kv_cache.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "data/generations/kv_copy.jsonl").read_text().splitlines()]
    assert [g["raw"] for g in got] == [w["raw"] for w in want]
    perf = json.loads((tmp_path / "metrics/techniques/kv_cache/perf.json").read_text())
    assert perf["resume"]["sessions"] == 2 and perf["resume"]["resumed_ids"] == ["r0", "r1"]
    assert list((tmp_path / ".cache/checkpoints").glob("*.jsonl")) == []


def test_three_timed_processes_resume_in_the_first_and_record_each(tiny_llama: Path, tmp_path: Path) -> None:
    """generate.processes: 3 starts three fresh processes; an interruption in process 1 resumes there, and perf.json
    keeps each process's pid and per-row latencies, the records each row's latency in every process."""
    params = stage_repo(tmp_path, tiny_llama, {"kv_cache": {}})
    params["generate"]["processes"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_generate(tmp_path, "kv_cache", **{checkpoint.STOP_AFTER: "2"}).returncode != 0
    out = run_generate(tmp_path, "kv_cache")
    assert out.returncode == 0, out.stderr
    perf = json.loads((tmp_path / "metrics/techniques/kv_cache/perf.json").read_text())
    procs = perf["processes"]
    assert perf["process_count"] == 3 and [p["process"] for p in procs] == [1, 2, 3] and len({p["pid"] for p in procs}) == 3
    assert procs[0]["resume"]["resumed_rows"] == 2 and procs[1]["resume"]["resumed_rows"] == 0
    assert perf["row_ids"] == [r["id"] for r in ROWS] and all(len(p["latency_s"]) == 5 for p in procs)
    assert perf["latency_count"] == 15 and perf["token_ids_differ_across_processes"] == []
    records = [json.loads(x) for x in (tmp_path / "data/generations/kv_cache.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        assert r["latency_s_processes"] == [p["latency_s"][i] for p in procs]
        assert r["latency_s"] == pytest.approx(sum(r["latency_s_processes"]) / 3)
    assert list((tmp_path / ".cache").rglob("*.json*")) == []  # checkpoint and process files are gone


def test_a_technique_that_raises_is_a_recorded_failure(tiny_llama: Path, tmp_path: Path) -> None:
    """A model folder with a broken config.json: the stage records {"failed", "traceback"} and exits 0 so the
    other techniques run; a finished technique's outputs stay as they were."""
    stage_repo(tmp_path, tiny_llama, {"kv_cache": {}, "broken": {"role": "target"}})
    (tmp_path / "data/models/broken").mkdir()
    (tmp_path / "data/models/broken/config.json").write_text("{not json")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["base"]["target"] = "broken"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_generate(tmp_path, "kv_cache").returncode == 0
    before = (tmp_path / "data/generations/kv_cache.jsonl").read_bytes(), (tmp_path / "metrics/techniques/kv_cache/perf.json").read_bytes()
    out = run_generate(tmp_path, "broken")
    assert out.returncode == 0, out.stderr
    perf = json.loads((tmp_path / "metrics/techniques/broken/perf.json").read_text())
    assert perf["failed"].split(":")[0].endswith("Error") and isinstance(perf["traceback"], list) and perf["traceback"]
    after = (tmp_path / "data/generations/kv_cache.jsonl").read_bytes(), (tmp_path / "metrics/techniques/kv_cache/perf.json").read_bytes()
    assert before == after
