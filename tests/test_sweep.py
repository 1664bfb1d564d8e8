"""A `dvc exp run --queue` grid run by `dvc queue start -j 2` (docs/sweeps-and-machines.md): every combination becomes its own
experiment, each runs with its own params, and the two parallel workers' timed sections never overlap (the timing lock)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

GRID = {"techniques.prune_l1.prune.amount": [0.2, 0.4], "generate.max_new_tokens": [16, 24]}

# the stage: reads its params and holds the timing lock for 1 s, as a timed section does
STAGE = """
import json, time, yaml
from headline_bench.measure.timing_lock import timed_section
p = yaml.safe_load(open("params.yaml"))
with timed_section("grid") as lock:
    enter = time.time()
    time.sleep(1.0)
    exit_ = time.time()
json.dump({"amount": p["techniques"]["prune_l1"]["prune"]["amount"], "max_new_tokens": p["generate"]["max_new_tokens"],
           "enter": enter, "exit": exit_, "wait_s": lock.wait_s}, open("metrics.json", "w"))
"""


def dvc(repo: Path, *args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"dvc {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_a_queued_grid_runs_every_combination_with_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                       "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)  # the workers inherit these, PYTHONPATH (this checkout's src/) and the test's timing lock
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text(yaml.safe_dump({"techniques": {"prune_l1": {"prune": {"amount": 0.3}}}, "generate": {"max_new_tokens": 24}}))
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"grid": {"cmd": f"{sys.executable} stage.py", "deps": ["stage.py"],
                                                                        "params": list(GRID), "metrics": [{"metrics.json": {"cache": False}}]}}}))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "grid"], cwd=repo, check=True)
    dvc(repo, "exp", "run", "--queue", *(a for key, values in GRID.items() for a in ("-S", f"{key}={','.join(map(str, values))}")))
    dvc(repo, "queue", "start", "-j", "2")
    try:
        deadline = time.time() + 170
        while "Queued" in (status := dvc(repo, "queue", "status")) or "Running" in status:
            assert time.time() < deadline, f"the queue did not finish in time:\n{status}"
            time.sleep(2)
    finally:
        subprocess.run([str(Path(sys.executable).with_name("dvc")), "queue", "stop"], cwd=repo, capture_output=True, timeout=60)
    assert status.count("Success") == 4, status
    runs = [r["data"]["metrics"]["metrics.json"]["data"] for base in json.loads(dvc(repo, "exp", "show", "--json"))
            for e in base.get("experiments") or [] for r in e["revs"]]
    assert sorted((r["amount"], r["max_new_tokens"]) for r in runs) == sorted(itertools.product(*GRID.values()))  # each ran its own params
    windows = sorted((r["enter"], r["exit"]) for r in runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows)), windows  # the timed sections never overlapped
