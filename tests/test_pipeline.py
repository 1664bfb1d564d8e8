"""End to end: `dvc repro` in a temporary copy of the repo with tiny models, three quality rows of which two are timed
in two processes each, then an experiment
focused on kv_cache and `dvc metrics diff` against the committed baseline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PIPELINE_FILES, ROOT, make_tiny_llama

DVC = [sys.executable, "-m", "dvc"]


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def committed_params() -> dict:
    """params.yaml as committed (HEAD), not as `dvc exp run -S ...` left it in the workspace; the file itself
    where git has no HEAD (an exported tree)."""
    out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    return yaml.safe_load(out.stdout if out.returncode == 0 else (ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git+DVC copy of the project with tiny models, 3 quality rows (2 timed) and three techniques, reproduced once."""
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    repo.mkdir()
    for item in [*PIPELINE_FILES, "params.yaml", "stages", "src", "data/sample", "calibration", ".dvcignore"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if src.is_dir() else {}))
    params = committed_params()
    params["models"] = {"tiny": {"path": str(make_tiny_llama(tmp / "tiny"))}, "tiny_target": {"path": str(make_tiny_llama(tmp / "tiny_target", seed=3))}}
    params["base"].update(model="tiny", target="tiny_target")
    params["prepare"].update(source="data/sample/news_sample.jsonl", summary_column="summary", id_column="id", shuffle=False, n=3, timed_rows=2)
    params["generate"].update(max_new_tokens=4, warmup_runs=1, max_input_tokens=1000, processes=2, quality_batch_size=2)  # byte-level tiny tokenizer: long prompts
    params["score"]["bootstrap_samples"] = 100
    params["techniques"] = {k: params["techniques"][k] for k in ["baseline", "kv_cache", "target_only"]}
    params["score"]["family"] = []  # pipelines/fidelity/dvc.yaml runs a stage per member, with its techniques entry: none of these is lossy
    params["technique"] = "baseline"  # whatever an experiment applied to the workspace
    params["serving"] = {"hf_serve_cb": params["serving"]["hf_serve_cb"]}  # its reference, kv_cache, is generated here
    params["serve"].update(rates=[4], concurrency=[2], requests=2, warmup_requests=1, search_steps=0, max_duration_s=5, runs=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(DVC + ["init", "-q"], repo)
    sh(DVC + ["repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline"], repo)
    return repo


def test_repro_writes_report_and_metrics(repo: Path) -> None:
    report = (repo / "metrics/report.md").read_text()
    for name in ["baseline", "kv_cache", "target_only"]:
        assert name in report
        perf = json.loads((repo / f"metrics/techniques/{name}/perf.json").read_text())
        score = json.loads((repo / f"metrics/techniques/{name}/score.json").read_text())
        assert perf["samples"] == 2 and perf["latency_s_p50"] > 0 and perf["process_count"] == 2 and len(perf["processes"]) == 2
        assert score["samples"] == 3 and score["timed_rows"] == 2  # quality over the 3 quality rows, the lossless check on the 2 timed ones
    kv = json.loads((repo / "metrics/techniques/kv_cache/score.json").read_text())
    assert kv["fidelity"] == 1.0 and kv["quality_source"] == "reference" and kv["quality_set"] == "data/quality/baseline.jsonl"
    assert kv["quality_state"] == "equivalent"  # lossless: outside the families, no test
    assert "not_run" in json.loads((repo / "metrics/techniques/kv_cache/quality.json").read_text())
    base_quality = json.loads((repo / "metrics/techniques/baseline/quality.json").read_text())  # uncached when timed, cached here
    assert base_quality["config"]["generate"]["use_cache"] is True and "KV cache" in base_quality["cache_note"]
    base_score = json.loads((repo / "metrics/techniques/baseline/score.json").read_text())
    assert base_score["batched_vs_timed"]["share"] == 1.0 and base_score["batched_vs_timed"]["compared"] == 2
    target = json.loads((repo / "metrics/techniques/target_only/score.json").read_text())
    assert target["quality_source"] == "quality pass" and target["quality_set"] == "data/quality/target_only.jsonl"
    assert target["quality_state"] == "too few rows" and target["family"] == "model comparison" and target["rows_to_decide"] >= 30
    assert json.loads((repo / "metrics/summary.json").read_text())["techniques"]["target_only"]["quality_state"] == "too few rows"
    assert target["batched_vs_timed"]["quality_batch_size"] == 2 and target["batched_vs_timed"]["compared"] == 2
    quality = [json.loads(x) for x in (repo / "data/quality/target_only.jsonl").read_text().splitlines()]
    assert len(quality) == 3 and "latency_s" not in quality[0] and quality[0]["token_ids"]
    assert json.loads((repo / "metrics/focus.json").read_text())["technique"] == "baseline"
    served = json.loads((repo / "metrics/serving/hf_serve_cb/serve.json").read_text())
    assert "failed" not in served and [lv["ok"] for lv in served["levels"]] == [2, 2, 2] and "## Online serving" in report
    assert [lv["run"] for lv in served["levels"]] == [1, 2, None] and len(served["sustainable_rate"]["runs"]) == 2   # two rate searches, then concurrency


def test_second_repro_does_nothing(repo: Path) -> None:
    out = sh(DVC + ["repro"], repo)
    assert "Running stage" not in out.stdout


def test_experiment_focus_and_metrics_diff(repo: Path) -> None:
    sh(DVC + ["exp", "run", "-S", "technique=kv_cache"], repo)
    focus = json.loads((repo / "metrics/focus.json").read_text())
    assert focus["technique"] == "kv_cache"
    diff = json.loads(sh(DVC + ["metrics", "diff", "--json"], repo).stdout)
    changed = diff["metrics/focus.json"]
    assert "latency_s_p50" in changed and "tokens_per_s" in changed  # another technique: another speed
    assert "rougeL" not in changed and "fidelity" not in changed  # kv_cache's headlines equal baseline's, so its quality does too
    shown = sh(DVC + ["exp", "show", "--json"], repo).stdout
    assert "kv_cache" in shown


def test_a_failing_rerun_keeps_the_finished_outputs(repo: Path) -> None:
    """A setting the schema lets through but generate() rejects (max_new_tokens -5) makes generate@kv_cache raise. Its
    outputs are `persist: true` and good, so the stage fails instead of recording the failure over them: `dvc repro`
    exits non-zero, the generations and metrics stay byte for byte, and dvc.lock is not updated (`dvc status` lists
    the stage as changed)."""
    outs = ["data/generations/kv_cache.jsonl", "metrics/techniques/kv_cache/perf.json", "metrics/techniques/kv_cache/score.json"]
    before = {p: (repo / p).read_bytes() for p in outs}
    params_text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["techniques"]["kv_cache"] = {"reference": "baseline", "generate": {"max_new_tokens": -5}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        out = subprocess.run(DVC + ["repro"], cwd=repo, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode != 0
        text = out.stdout + out.stderr
        assert "error: kv_cache failed: ValueError" in text and "last finished outputs" in text or "max_new_tokens" in text
        assert {p: (repo / p).read_bytes() for p in outs} == before
        assert "pipelines/generate/dvc.yaml:generate@kv_cache" in json.loads(sh(DVC + ["status", "--json"], repo).stdout)
    finally:
        (repo / "params.yaml").write_text(params_text)


def test_changing_load_settings_reruns_only_serving(repo: Path) -> None:
    """`dvc exp run -S serve.rates=[...]` must not rerun generation or scoring."""
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["serve"]["rates"] = [2, 8]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stale = set(json.loads(sh(DVC + ["status", "--json"], repo).stdout))
    finally:
        params_file.write_text(original)
    assert stale == {"pipelines/serve/dvc.yaml:serve@hf_serve_cb"}  # serve_report and report follow from its outputs when it reruns


def test_a_temp_experiment_runs_its_own_code(repo: Path) -> None:
    """`dvc exp run --temp` runs the stages in a copy of the workspace: the copy's code must be what runs (stages import
    headline_bench from their own workspace's src/, stages/_workspace.py), not an installed package's. The experiment
    changes one line of the report's code (uncommitted, as `dvc exp run` takes it); the experiment's report.md carries
    the change and the workspace's report.md stays as it was."""
    code = repo / "src/headline_bench/render/report.py"
    original = code.read_text()
    title = 'f"# Headline generation: inference techniques benchmark (focus: {focus})"'
    assert title in original
    before = (repo / "metrics/report.md").read_text()
    code.write_text(original.replace(title, title[:-2] + ') [exp-own-code]"'))
    try:
        sh(DVC + ["exp", "run", "--temp", "-n", "own-code"], repo)
    finally:
        code.write_text(original)
    assert (repo / "metrics/report.md").read_text() == before  # --temp leaves the workspace alone
    shown = sh(["git", "show", ref_of(repo, "own-code") + ":metrics/report.md"], repo).stdout
    assert shown.splitlines()[0].endswith("[exp-own-code]")


def ref_of(repo: Path, name: str) -> str:
    """The git ref (refs/exps/...) of the experiment called `name`."""
    refs = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return ref
