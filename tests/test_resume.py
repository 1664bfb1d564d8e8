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
from headline_bench.errors import InputError
from headline_bench.measure import checkpoints as checkpoint
from headline_bench.measure.environment import env_info
from headline_bench.settings import parse
from headline_bench.techniques.config import resolve

ROWS = [{"id": f"r{i}", "summary": f"the city council vote number {i} on the new budget", "reference": "council vote"} for i in range(5)]


def files() -> list[Path]:
    return sorted(checkpoint.CHECKPOINTS.glob("*.jsonl"))


def interrupted(params: dict[str, Any], monkeypatch: pytest.MonkeyPatch, stop_after: int) -> Path:
    """Run kv_cache until STOP_AFTER interrupts it; the checkpoint it leaves."""
    monkeypatch.setenv(checkpoint.STOP_AFTER, str(stop_after))
    with pytest.raises(KeyboardInterrupt):
        generate("kv_cache", parse(params), ROWS)
    monkeypatch.delenv(checkpoint.STOP_AFTER)
    (path,) = files()
    return path


@pytest.mark.parametrize(("name", "stop_after", "resumed"), [("kv_cache", 2, 2), ("batched", 3, 4)])
def test_interrupted_run_resumes_with_identical_predictions(models_dir: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                             name: str, stop_after: int, resumed: int) -> None:
    params = copy.deepcopy(BASE_PARAMS)
    full, full_perf = generate(name, parse(params), ROWS)
    assert files() == [] and full_perf["resume"]["sessions"] == 1 and full_perf["resume"]["resumed_rows"] == 0

    monkeypatch.setenv(checkpoint.STOP_AFTER, str(stop_after))
    with pytest.raises(KeyboardInterrupt):
        generate(name, parse(params), ROWS)
    (path,) = files()
    assert path.name.startswith(f"{name}-")
    monkeypatch.delenv(checkpoint.STOP_AFTER)

    records, perf = generate(name, parse(params), ROWS)
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
        generate("kv_cache", parse(params), ROWS)
    monkeypatch.delenv(checkpoint.STOP_AFTER)
    params["generate"]["max_new_tokens"] = 4
    _, perf = generate("kv_cache", parse(params), ROWS)
    assert perf["resume"]["resumed_rows"] == 0
    _, perf = generate("kv_cache", parse(params), ROWS[:3])  # other rows: another key too
    assert perf["resume"]["resumed_rows"] == 0


def test_a_line_cut_by_the_interruption_is_rerun(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    params = copy.deepcopy(BASE_PARAMS)
    path = interrupted(params, monkeypatch, 3)
    path.write_text(path.read_text()[:-20])  # the third row's line half written
    _, perf = generate("kv_cache", parse(params), ROWS)
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
    lines = [json.loads(x) for x in next((tmp_path / ".cache/checkpoints").glob("kv_cache-*.jsonl")).read_text().splitlines()]
    assert [line["ids"] for line in lines if "gens" in line] == [["r0"], ["r1"]] and lines[0]["env"]["host"]  # the session's environment first
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
    assert all(p["timing_lock"]["label"] == "generate kv_cache" and p["tpot_s_p50"] > 0 for p in procs)  # each process's own lock and TPOT
    assert perf["timing_lock_wait_s"] == sum(p["timing_lock_wait_s"] for p in procs) and "timing_lock" not in perf
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


def batch_ids(path: Path) -> list[list[str]]:
    return [entry["ids"] for entry in map(json.loads, path.read_text().splitlines()) if "gens" in entry]


def test_a_cut_line_is_trimmed_before_the_next_session_appends(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Session 1 stops after 3 rows with its last line cut; session 2 trims it, appends one row and stops; session 3
    finishes: every line of the file stays whole, and the predictions equal an uninterrupted run's."""
    params = copy.deepcopy(BASE_PARAMS)
    full, _ = generate("kv_cache", parse(params), ROWS)
    path = interrupted(params, monkeypatch, 3)
    path.write_text(path.read_text()[:-20])  # the third row's line half written, no newline
    assert interrupted(params, monkeypatch, 1) == path
    assert batch_ids(path) == [["r0"], ["r1"], ["r2"]]  # the cut line is gone, not glued to the new one
    assert all(json.loads(line) for line in path.read_text().splitlines())
    records, perf = generate("kv_cache", parse(params), ROWS)
    assert [r["raw"] for r in records] == [r["raw"] for r in full]
    resume = perf["resume"]
    assert resume["sessions"] == 3 and resume["resumed_rows"] == 3
    assert [(s["session"], s["rows"]) for s in resume["session_envs"]] == [(1, 2), (2, 1), (3, 2)]
    assert all(s["env"]["torch_threads"] for s in resume["session_envs"])


def test_rows_whose_ids_do_not_match_are_rerun(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    params = copy.deepcopy(BASE_PARAMS)
    path = interrupted(params, monkeypatch, 3)
    path.write_text(path.read_text().replace('"ids": ["r1"]', '"ids": ["r4"]'))  # row 2's batch claims another row
    records, perf = generate("kv_cache", parse(params), ROWS)
    assert perf["resume"]["resumed_rows"] == 1 and [r["id"] for r in records] == [r["id"] for r in ROWS]


def test_a_second_run_of_the_same_technique_stops_with_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    """While one run holds kv_cache's lock, a second one exits non-zero with one line and writes nothing; another
    technique runs meanwhile."""
    stage_repo(tmp_path, tiny_llama, {"kv_cache": {}, "kv_copy": {}})
    lock_dir = tmp_path / ".cache/checkpoints"
    lock_dir.mkdir(parents=True)
    original = checkpoint.CHECKPOINTS
    checkpoint.CHECKPOINTS = lock_dir
    try:
        with checkpoint.exclusive("kv_cache"):
            with pytest.raises(InputError, match="another run of this technique is in progress"):
                with checkpoint.exclusive("kv_cache"):
                    pass
            out = run_generate(tmp_path, "kv_cache")
            other = run_generate(tmp_path, "kv_copy")
    finally:
        checkpoint.CHECKPOINTS = original
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1 and "kv_cache: another run of this technique is in progress (pid" in errors[0]
    assert not (tmp_path / "data/generations/kv_cache.jsonl").exists()
    assert other.returncode == 0 and (tmp_path / "data/generations/kv_copy.jsonl").exists()
    assert run_generate(tmp_path, "kv_cache").returncode == 0  # released with the holder


def test_clear_matches_the_technique_name_exactly() -> None:
    checkpoint.CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    for name in ("kv-0123456789abcdef.jsonl", "kv-big-0123456789abcdef.jsonl", "kv-fedcba9876543210.jsonl", "kv-notes.jsonl"):
        (checkpoint.CHECKPOINTS / name).write_text("")
    checkpoint.clear("kv")
    assert sorted(p.name for p in checkpoint.CHECKPOINTS.iterdir()) == ["kv-big-0123456789abcdef.jsonl", "kv-notes.jsonl"]


def test_the_key_covers_environment_and_gguf_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread count, device or library version, or another GGUF file under the same name: another key."""
    from headline_bench.models import convert

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF one")
    monkeypatch.setattr(convert, "locate_gguf", lambda spec: gguf)
    raw = copy.deepcopy(BASE_PARAMS) | {"models": {"tiny": {"gguf_package": "pkg", "gguf_file": "model.gguf"}}}
    raw["techniques"] = {"llamacpp": {"engine": "llama_cpp"}, "kv_cache": {}}
    params = parse(raw)
    cfg = resolve(params, "llamacpp")
    env = env_info("llama_cpp")
    first = checkpoint.key(cfg, params, ROWS, env)
    assert checkpoint.key(cfg, params, ROWS, dict(env)) == first
    for changed in ({"torch_threads": env["torch_threads"] + 1}, {"omp_num_threads": "7"}, {"device": "NVIDIA H200"}, {"torch": "9.9"},
                    {"engine": "llama-cpp-python 0.0.1"}, {"host": "elsewhere"}):
        assert checkpoint.key(cfg, params, ROWS, env | changed) != first, changed
    gguf.write_bytes(b"GGUF two")
    assert checkpoint.key(cfg, params, ROWS, env) != first
    assert checkpoint.gguf_sha256(resolve(params, "kv_cache"), params) is None  # other engines do not read the file


def test_a_failing_rerun_keeps_the_good_outputs_and_fails_the_stage(tiny_llama: Path, tmp_path: Path) -> None:
    """kv_cache finished once; a rerun that raises (a setting generate() rejects) leaves its generations and perf.json
    byte for byte and exits non-zero with one line naming the failure, so DVC keeps them and does not relock."""
    params = stage_repo(tmp_path, tiny_llama, {"kv_cache": {}})
    assert run_generate(tmp_path, "kv_cache").returncode == 0
    outs = [tmp_path / "data/generations/kv_cache.jsonl", tmp_path / "metrics/techniques/kv_cache/perf.json"]
    before = [p.read_bytes() for p in outs]
    params["techniques"]["kv_cache"] = {"batch_size": 2, "generate": {"prompt_lookup_num_tokens": 3}}  # valid params; transformers refuses
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_generate(tmp_path, "kv_cache")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1
    assert errors[0].startswith("error: kv_cache failed: ValueError") and "last finished outputs" in errors[0]
    assert [p.read_bytes() for p in outs] == before


@pytest.mark.parametrize("signame", ["SIGILL", "SIGKILL"])
def test_a_timed_process_killed_by_a_signal_is_a_recorded_failure(tiny_llama: Path, tmp_path: Path, signame: str) -> None:
    """An engine built for another CPU dies with SIGILL, the OOM killer sends SIGKILL: the timed process is gone without
    a word. The stage records the technique's failure naming the signal and exits 0, so `dvc repro` goes on with the
    other techniques. The child kills itself from a sitecustomize on PYTHONPATH (as the process starts, before any
    model loads), which no project code knows about."""
    params = stage_repo(tmp_path, tiny_llama, {"kv_cache": {}})
    params["generate"]["processes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"import os, signal, sys\nif '--process' in sys.argv:\n    os.kill(os.getpid(), signal.{signame})\n")
    out = run_generate(tmp_path, "kv_cache", PYTHONPATH=str(hook))
    assert out.returncode == 0, out.stderr[-2000:]
    perf = json.loads((tmp_path / "metrics/techniques/kv_cache/perf.json").read_text())
    assert perf["failed"].startswith("ProcessDied: ") and "timed process 1 of 2 died by signal " + signame in perf["failed"]
    assert (tmp_path / "data/generations/kv_cache.jsonl").read_text() == ""
