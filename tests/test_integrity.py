"""Nothing lost, nothing run that was not asked: a failed or skipped rerun keeps the last finished outputs of every
stage, a child process killed by a signal is a recorded failure, and a stage's children end with it."""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_generate import BASE_PARAMS, ROWS

from conftest import PIPELINE_FILES, ROOT, pipeline_stages, stage
from headline_bench import files
from headline_bench.benchmark import write_outputs, write_quality
from headline_bench.children import TEST_SIGNAL

GOOD = {"technique": "kv_cache", "samples": 3, "started_at": "2026-12-05T10:00:00+0000"}


def workspace(tmp: Path, tiny: Path, generate: dict[str, Any] | None = None) -> dict[str, Any]:
    """A folder shaped like the repo (params.yaml, data/prepared, data/models/tiny) for running stages as DVC does."""
    (tmp / "data/models").mkdir(parents=True)
    (tmp / "data/models/tiny").symlink_to(tiny, target_is_directory=True)
    files.write_jsonl(tmp / "data/prepared/timed.jsonl", ROWS)
    files.write_jsonl(tmp / "data/prepared/quality.jsonl", ROWS)
    params = copy.deepcopy(BASE_PARAMS)
    params["generate"] |= generate or {}
    params["techniques"] = {"kv_cache": {}, "batched": {"batch_size": 2}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGILL / SIGSEGV would write one


def run_stage(tmp: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, preexec_fn=no_core_dump)


def errors(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture()
def tiny_source(tiny_llama: Path, tmp_path: Path) -> Path:
    """The tiny model with the source.json the models stage writes."""
    import shutil

    path = tmp_path / "tiny-model"
    shutil.copytree(tiny_llama, path)
    (path / "source.json").write_text('{"name": "tiny", "id": "tiny-random-llama"}')
    return path


# --- a child process killed by a signal ---------------------------------------------------------------------------

def test_a_timed_process_killed_by_a_signal_is_a_recorded_failure(tiny_source: Path, tmp_path: Path) -> None:
    """generate@kv_cache's timed process dies by SIGILL (an engine built for another CPU): perf.json records the
    failure naming the signal and the stage exits 0, so `dvc repro` goes on to the next technique."""
    work = tmp_path / "work"
    workspace(work, tiny_source, {"processes": 2})
    out = run_stage(work, "generate.py", "kv_cache", **{TEST_SIGNAL: "kv_cache:SIGILL"})
    assert out.returncode == 0, out.stderr[-2000:]
    perf = json.loads((work / "metrics/techniques/kv_cache/perf.json").read_text())
    assert "timed process 1 of 2 died by signal SIGILL (Illegal instruction)" in perf["failed"]
    assert (work / "data/generations/kv_cache.jsonl").read_text() == ""


def test_the_quality_process_killed_by_a_signal_is_a_recorded_failure_and_keeps_a_finished_pass(tiny_source: Path, tmp_path: Path) -> None:
    """The quality pass runs in a child: SIGSEGV there is kv_cache's recorded failure (exit 0) while nothing finished
    exists; once a pass finished, the same death leaves it byte for byte and fails the stage with one line."""
    work = tmp_path / "work"
    workspace(work, tiny_source)
    died = run_stage(work, "quality.py", "kv_cache", **{TEST_SIGNAL: "kv_cache:SIGSEGV"})
    assert died.returncode == 0, died.stderr[-2000:]
    facts = json.loads((work / "metrics/techniques/kv_cache/quality.json").read_text())
    assert "quality process died by signal SIGSEGV" in facts["failed"]
    assert run_stage(work, "quality.py", "kv_cache").returncode == 0
    outs = [work / "data/quality/kv_cache.jsonl", work / "metrics/techniques/kv_cache/quality.json"]
    before = [p.read_bytes() for p in outs]
    assert len(before[0].splitlines()) == len(ROWS) and b"failed" not in before[1]
    again = run_stage(work, "quality.py", "kv_cache", **{TEST_SIGNAL: "kv_cache:SIGKILL"})
    assert again.returncode != 0 and len(errors(again)) == 1
    assert "kv_cache failed: ProcessDied" in errors(again)[0] and "SIGKILL" in errors(again)[0] and "last finished outputs" in errors(again)[0]
    assert [p.read_bytes() for p in outs] == before


# --- a failure or skip never replaces finished outputs ------------------------------------------------------------

@pytest.mark.parametrize("outcome", [{"failed": "ImportError: no module named llama_cpp"}, {"skipped": "llama-cpp-python is not installed"}])
def test_a_failure_or_skip_never_replaces_finished_generations_or_quality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          outcome: dict[str, str]) -> None:
    monkeypatch.chdir(tmp_path)
    gens, perf = tmp_path / "data/generations/kv_cache.jsonl", tmp_path / "metrics/techniques/kv_cache/perf.json"
    quality, facts = tmp_path / "data/quality/kv_cache.jsonl", tmp_path / "metrics/techniques/kv_cache/quality.json"
    write_outputs("kv_cache", [], {"technique": "kv_cache"} | outcome)  # nothing finished yet: recorded
    write_quality("kv_cache", [], {"technique": "kv_cache"} | outcome)
    assert json.loads(perf.read_text()).keys() & outcome.keys() and json.loads(facts.read_text()).keys() & outcome.keys()
    files.write_jsonl(gens, [{"id": "r0", "prediction": "x"}])
    files.write_json(perf, GOOD)
    files.write_jsonl(quality, [{"id": "r0", "prediction": "x"}])
    files.write_json(facts, GOOD)
    before = [p.read_bytes() for p in (gens, perf, quality, facts)]
    for write in (write_outputs, write_quality):
        with pytest.raises(SystemExit, match="kv_cache (failed|skipped): .*last finished outputs .*measured 2026-12-05T10:00:00"):
            write("kv_cache", [], {"technique": "kv_cache"} | outcome)
    assert [p.read_bytes() for p in (gens, perf, quality, facts)] == before


def test_a_failed_serve_rerun_keeps_the_finished_serve_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.json and data/served are `persist: true`; a server that dies on the rerun leaves them and fails the stage."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    files.write_jsonl(tmp_path / "data/prepared/timed.jsonl", ROWS)
    files.write_jsonl(tmp_path / "data/prepared/quality.jsonl", ROWS)  # the served quality pass reads the quality rows
    monkeypatch.chdir(tmp_path)
    entry = next(iter(yaml.safe_load((ROOT / "params.yaml").read_text())["serving"]))
    served, metrics = tmp_path / f"data/served/{entry}.jsonl", tmp_path / f"metrics/serving/{entry}/serve.json"
    outcomes = iter([({"entry": entry, "failed": "ServerError: exited before ready"}, []),
                     ({"entry": entry, "levels": [{"ok": 2}]}, [{"id": "r0", "prediction": "x"}]),
                     ({"entry": entry, "failed": "ServerError: the server died"}, [])])
    monkeypatch.setattr(sys, "argv", ["serve.py", entry])

    def run_serve() -> None:
        module = stage("serve")
        monkeypatch.setattr(module, "serve", lambda *_: next(outcomes))
        module.main()

    run_serve()  # nothing finished: the failure is recorded, exit 0
    assert "failed" in json.loads(metrics.read_text())
    run_serve()
    before = [served.read_bytes(), metrics.read_bytes()]
    with pytest.raises(SystemExit, match=f"serve {entry} failed: ServerError: the server died; its last finished outputs"):
        run_serve()
    assert [served.read_bytes(), metrics.read_bytes()] == before
    outs = {k: v for out in pipeline_stages()["serve"]["do"]["outs"] for k, v in out.items()}
    assert outs["data/served/${key}.jsonl"]["persist"] and outs["metrics/serving/${key}/serve.json"]["persist"]  # DVC leaves them in place


# --- names never reach a shell ------------------------------------------------------------------------------------

HOSTILE = ["x;touch hb_pwned", "y';touch hb_pwned;'"]  # the second ends any single quotes around it


def test_dvc_yaml_commands_carry_no_template() -> None:
    """DVC runs `cmd` through a shell: a templated name there runs before any schema sees it (settings.stage_key)."""
    for name, spec in pipeline_stages().items():
        assert "${" not in spec.get("do", spec)["cmd"], name


def test_a_stage_takes_its_name_from_dvc_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from headline_bench.settings import stage_key

    monkeypatch.setenv("DVC_STAGE", "generate@kv_cache")
    assert stage_key("generate", None) == "kv_cache" and stage_key("generate", "batched") == "batched"  # by hand: the argument
    monkeypatch.setenv("DVC_STAGE", "sub/dvc.yaml:quality@kv_cache")
    assert stage_key("quality", None) == "kv_cache"
    for stage_name, addressing in [("quality", "generate@kv_cache"), ("score", ""), ("serve", "serve@")]:
        monkeypatch.setenv("DVC_STAGE", addressing)
        with pytest.raises(SystemExit, match=f"usage: python stages/{stage_name}.py <name>"):
            stage_key(stage_name, None)


def test_a_hostile_name_is_refused_before_any_shell_runs_it(tmp_path: Path) -> None:
    """`dvc repro` of generate, quality and serve for names that would run `touch hb_pwned` if they reached the shell:
    each stage fails with one line naming the bad name, and no hb_pwned file appears."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for item in [*PIPELINE_FILES, "stages", "src", "calibration"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["techniques"] |= {name: {} for name in HOSTILE}
    params["serving"] = {name: {"engine": "transformers", "reference": "baseline"} for name in HOSTILE}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for path in ["data/prepared/timed.jsonl", "data/prepared/quality.jsonl", "data/generations/baseline.jsonl", "data/models/README",
                 "data/quality/baseline.jsonl", "metrics/techniques/baseline/perf.json"]:  # every dep of the stages run
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    for name in HOSTILE:
        for stage_name in ("generate", "quality", "serve"):
            out = subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", f"pipelines/{stage_name}/dvc.yaml:{stage_name}@{name}"], cwd=repo, capture_output=True,
                                 text=True, env=env, timeout=300)
            assert not list(repo.rglob("hb_pwned*")), f"{stage_name}@{name} ran the shell command in its name"
            assert out.returncode != 0, out.stdout
            assert f"error: {name!r}: names may hold only letters, digits and _" in out.stderr + out.stdout, out.stderr[-2000:]


# --- a stage's children end with it -------------------------------------------------------------------------------

def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2] if entry.name.isdigit() else (None, None)
        except OSError:
            continue
        if state:
            table[int(entry.name)] = (int(ppid), state)
    return table


def descendants(pid: int) -> dict[int, str]:
    """{pid: state} of every process below `pid`."""
    table, found, todo = process_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state) in table.items():
            if ppid == parent and child not in found:
                found[child] = state
                todo.append(child)
    return found


def running(pids: list[int]) -> list[int]:
    table = process_table()
    return [p for p in pids if p in table and table[p][1] not in "ZX"]  # a zombie has ended; its new parent may never reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize(("technique", "stopped"), [("kv_cache", 1), ("tp2", 2)])
def test_the_stages_children_end_with_it(tiny_source: Path, tmp_path: Path, sig: signal.Signals, technique: str, stopped: int) -> None:
    """generate's timed process (kv_cache, 2 processes) or torchrun and its 2 ranks (tp2) stop themselves (SIGSTOP);
    SIGTERM or SIGKILL of the stage then ends every one of them: none is left to hold the cores or write results."""
    work = tmp_path / "work"
    params = workspace(work, tiny_source, {"processes": 2} if technique == "kv_cache" else {"warmup_runs": 0})
    params["techniques"]["tp2"] = {"parallel": {"tp_size": 2}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", TEST_SIGNAL: f"{technique}:SIGSTOP"}
    with open(work / "stage.log", "w") as log:
        stage_proc = subprocess.Popen([sys.executable, str(ROOT / "stages/generate.py"), technique], cwd=work, env=env, stdout=log, stderr=log)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while sum(state == "T" for state in descendants(stage_proc.pid).values()) < stopped:
            assert stage_proc.poll() is None and time.monotonic() < deadline, (work / "stage.log").read_text()[-2000:]
            time.sleep(0.2)
        children = list(descendants(stage_proc.pid))
        stage_proc.send_signal(sig)
        stage_proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(children), f"left running after {sig.name} of the stage: {running(children)}"
    finally:
        for pid in running(children):
            os.kill(pid, signal.SIGKILL)
        if stage_proc.poll() is None:
            stage_proc.kill()


# --- score reads only what it declares, and nothing missing is read as empty ---------------------------------------

def test_a_reference_outside_scores_declared_deps_is_a_schema_error() -> None:
    from headline_bench.settings import check

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["techniques"]["kv_cache"]["reference"] = "batched"  # score@kv_cache would read batched's files, undeclared
    problems = check(params)
    assert len(problems) == 1 and problems[0].startswith("techniques.kv_cache.reference: 'batched' is not one of baseline, target_only")


def test_a_missing_reference_file_is_an_error_not_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache's lossless check reads baseline's timed rows: without the file the score stops with one line naming
    it, where it used to find "no rows to compare"."""
    from headline_bench.errors import InputError
    from headline_bench.quality.score import score_technique
    from headline_bench.settings import parse

    params = parse(yaml.safe_load((ROOT / "params.yaml").read_text()))
    monkeypatch.chdir(tmp_path)
    files.write_json(Path("metrics/techniques/kv_cache/perf.json"), {"technique": "kv_cache", "dtype": "float32", "device": "cpu"})
    files.write_jsonl(Path("data/generations/kv_cache.jsonl"), [{"id": "0", "prediction": "x", "token_ids": [1, 2], "margins": [1.0, 1.0]}])
    with pytest.raises(InputError, match="data/generations/baseline.jsonl: missing"):
        score_technique("kv_cache", params)
    files.write_jsonl(Path("data/generations/baseline.jsonl"), [{"id": "0", "prediction": "x", "token_ids": [1, 2], "margins": [1.0, 1.0]}])
    with pytest.raises(InputError, match="data/quality/baseline.jsonl: missing"):
        score_technique("kv_cache", params)


# --- shared files: built in the workspace's cache, atomically; nothing written into data/models -------------------

def fake_chunked_package(monkeypatch: pytest.MonkeyPatch, payload: bytes, fail_after: int | None = None) -> None:
    """A stand-in for a chunked GGUF package: assemble() writes `payload` to the path it is given (stopping with an
    OSError after `fail_after` bytes, as a full disk or a kill would) and checks the sha256 like the real one."""
    import hashlib
    import types

    module = types.ModuleType("chunked_gguf")
    module.MODEL_NAME, module.EXPECTED_SHA256 = "m.gguf", hashlib.sha256(payload).hexdigest()

    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        with open(output_path, "wb") as f:
            f.write(payload[:fail_after])
            if fail_after is not None:
                raise OSError(28, "No space left on device")
        return Path(output_path)

    module.assemble = assemble
    monkeypatch.setitem(sys.modules, "chunked_gguf", module)


def test_a_chunked_gguf_is_assembled_atomically_in_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headline_bench.errors import Skip
    from headline_bench.models.convert import assemble_gguf

    monkeypatch.chdir(tmp_path)
    target = Path(".cache/gguf/chunked_gguf/m.gguf")
    fake_chunked_package(monkeypatch, b"GGUF" * 1000, fail_after=100)
    with pytest.raises(Skip, match="could not assemble its GGUF file .*No space left"):
        assemble_gguf("chunked_gguf")
    assert not target.exists() and not list(target.parent.iterdir())  # no truncated file, no partial one left
    fake_chunked_package(monkeypatch, b"GGUF" * 1000)
    assert assemble_gguf("chunked_gguf") == target and target.read_bytes() == b"GGUF" * 1000
    target.write_bytes(b"GGUF")  # damaged in place (by some other writer): rebuilt, not trusted
    assert assemble_gguf("chunked_gguf") == target and target.read_bytes() == b"GGUF" * 1000


def test_random_weights_for_disk_loaders_go_to_the_workspace_cache(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random-weight model in data/models has no checkpoint; a loader that reads from disk gets one written once
    under .cache/random-weights, and data/models (the models stage's output) stays as the stage left it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from headline_bench.models.convert import weights_folder

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data/models/rand"
    shutil.copytree(tiny_llama, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "source.json").write_text(json.dumps({"name": "rand", "random": True, "seed": 3, "init_device": "cpu", "dtype": "float32"}))
    before = sorted(p.name for p in folder.iterdir())
    cached = weights_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert cached.parent == Path(".cache/random-weights") and list(cached.glob("*.safetensors"))
    stamp = [p.stat().st_mtime_ns for p in cached.glob("*.safetensors")]
    assert weights_folder(folder) == cached and [p.stat().st_mtime_ns for p in cached.glob("*.safetensors")] == stamp  # written once
    from headline_bench.models.convert import random_model

    loaded = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    built = random_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), built.state_dict().values()))
    assert weights_folder(tiny_llama) == tiny_llama  # a model with a checkpoint is loaded where it is


def test_the_inductor_cache_is_the_workspaces_own() -> None:
    code = "import _workspace, torch._inductor.runtime.cache_dir_utils as c; print(c.cache_dir())"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "stages", env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(ROOT / ".cache" / "inductor")


# --- the schema refuses what the code would refuse, overwrite or ignore --------------------------------------------

@pytest.mark.parametrize(("path", "value", "line"), [
    ("serving.hf_serve.reference", None, "serving.hf_serve: reference: null is not allowed"),
    ("serving.vllm_serve.args", ["--host", "0.0.0.0"], "serving.vllm_serve: args: --host: set by the harness (the server listens on 127.0.0.1 only"),
    ("serving.vllm_serve.args", ["--port=8001"], "serving.vllm_serve: args: --port=8001: set by the harness"),
    ("techniques.kv_cache.generate", {"do_sample": True}, "techniques.kv_cache.generate: do_sample: set by the harness (greedy decoding: False)"),
    ("techniques.kv_cache.generate", {"pad_token_id": 0}, "techniques.kv_cache.generate: pad_token_id: set by the harness"),
    ("techniques.kv_cache.generate", {"logits_processor": []}, "techniques.kv_cache.generate: logits_processor: set by the harness"),
    ("techniques.kv_cache.generate", {"streamer": "x"}, "techniques.kv_cache.generate: streamer: set by the harness"),
    ("techniques.kv_cache.generate", {"eos_token_id": [2]}, "techniques.kv_cache.generate: eos_token_id: set by the harness"),
    ("techniques.llamacpp.generate", {"use_cache": False}, "techniques.llamacpp: generate.use_cache: not applied by engine llama_cpp"),
    ("techniques.vllm.generate", {"num_beams": 2}, "techniques.vllm: generate.num_beams: not applied by engine vllm"),
    ("techniques.compiled_loop.generate", {"cache_implementation": "static"},
     "techniques.compiled_loop: generate.cache_implementation: not applied by the compiled decode loop"),
])
def test_settings_the_code_would_refuse_overwrite_or_ignore_are_one_line_errors(path: str, value: Any, line: str) -> None:
    from headline_bench.settings import check

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, key = path.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[key] = value
    problems = check(params)
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_the_engines_still_take_the_generate_keys_they_apply() -> None:
    from headline_bench.settings import check

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["techniques"]["llamacpp"]["generate"] = {"max_new_tokens": 8}
    params["techniques"]["compiled_loop"]["generate"] = {"min_new_tokens": 8}
    assert check(params) == []


# --- scripts: one-line errors, scratch folders removed -------------------------------------------------------------

@pytest.mark.parametrize(("argv", "line"), [(["--techniques", "compiled_loop_cpu,foo"], "error: --techniques: foo not in params.yaml's techniques"),
                                            (["--rounds", "0"], "error: --rounds 0: at least 1 round is needed")])
def test_decode_bench_bad_arguments_are_one_line(argv: list[str], line: str) -> None:
    from headline_bench import decode_bench

    with pytest.raises(SystemExit) as e:
        decode_bench.main(argv)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_decode_bench_removes_its_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headline_bench import decode_bench

    root = tmp_path / "repo"
    (root / "data/models/smollm2-135m").mkdir(parents=True)
    (root / "data/models/smollm2-135m/config.json").write_text("{}")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(decode_bench, "ROOT", root)
    monkeypatch.setattr(decode_bench, "stage", lambda *_: (1, 0.0))  # prepare fails after the scratch folder is made
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(SystemExit, match="prepare failed"):
        decode_bench.main(["--out", str(tmp_path / "out")])
    assert not list(tmp_path.glob("bench-decode-*"))


def test_gpu_check_refuses_an_alias_in_its_passes_file_and_removes_its_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headline_bench import gpu_check

    passes = tmp_path / "passes.yaml"
    passes.write_text("common: &c {generate: {max_new_tokens: 2}}\npasses: {a: *c}\n")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--passes", str(passes)])
    assert str(e.value).startswith(f"error: --passes {passes}: line 1: YAML anchors and aliases are not allowed") and "\n" not in str(e.value)

    def crash(args: Any, spec: Any, params: Any, work: Path, deadline: float) -> None:
        (work / "models").mkdir(parents=True)
        raise RuntimeError("the device part crashed")

    passes.write_text("passes: {a: {}}\n")
    monkeypatch.setattr(gpu_check, "run_passes", crash)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(RuntimeError):
        gpu_check.main(["--passes", str(passes), "--out", str(tmp_path / "out")])
    assert not list(tmp_path.glob("gpu-check-*"))


@pytest.mark.parametrize("name", ["../escape", "a b", "-x", ""])
def test_quality_run_refuses_a_name_that_is_not_a_folder_name(name: str, tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(ROOT / "scripts/quality-run"), name, "3", "float32", "kv_cache"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith(f"error: NAME '{name}'") and len(out.stderr.splitlines()) == 1


# --- tensor parallel: every socket the ranks and torchrun listen on is on the loopback interface --------------------

def listening(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets `pids` listen on (`ss -ltnp`)."""
    import re

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids}


@pytest.mark.skipif(not Path("/usr/bin/ss").exists() and not Path("/bin/ss").exists(), reason="needs ss (iproute2)")
def test_tensor_parallel_listens_on_loopback_only(tiny_source: Path, tmp_path: Path) -> None:
    """A 2-rank TP run of the generate stage on CPU, its process tree's listening sockets sampled with `ss` throughout:
    the rendezvous store on the --master-port torchrun was given, and every other socket (gloo pairs), bind 127.0.0.1."""
    import re

    work = tmp_path / "work"
    params = workspace(work, tiny_source, {"warmup_runs": 2, "repeats": 2})
    params["techniques"] = {"tp2": {"parallel": {"tp_size": 2}}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    with open(work / "stage.log", "w") as log:
        stage_proc = subprocess.Popen([sys.executable, str(ROOT / "stages/generate.py"), "tp2"], cwd=work, stdout=log, stderr=log,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        seen: set[str] = set()
        try:
            while stage_proc.poll() is None:
                seen |= listening({stage_proc.pid, *descendants(stage_proc.pid)})
                time.sleep(0.05)
        finally:
            if stage_proc.poll() is None:
                stage_proc.kill()
    text = (work / "stage.log").read_text()
    assert stage_proc.returncode == 0, text[-2000:]
    perf = json.loads((work / "metrics/techniques/tp2/perf.json").read_text())
    assert "failed" not in perf and perf["tp_size"] == 2 and perf["samples"] == len(ROWS), text[-2000:]
    port = re.search(r"--master-addr 127\.0\.0\.1 --master-port (\d+)", text).group(1)
    assert f"127.0.0.1:{port}" in seen, seen  # the rendezvous store was seen, bound to loopback
    assert all(addr.startswith(("127.0.0.1:", "[::1]:")) for addr in seen), seen
