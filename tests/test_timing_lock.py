"""The machine-wide timing lock: timed sections in two processes never overlap, the later one records its wait and
whom it waited for, a process started by the holder does not wait for it, and generate() records the wait in perf.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headline_bench.measure.timing_lock import HELD_ENV, timed_section

# one timed section in a fresh process: wait for the start signal, hold the lock for `hold` seconds, print what happened
SECTION = """
import json, sys, time
from pathlib import Path
from headline_bench.measure.timing_lock import timed_section
go, label, hold = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
with timed_section(label) as lock:
    enter = time.time()
    time.sleep(hold)
    exit_ = time.time()
print(json.dumps({"label": label, "enter": enter, "exit": exit_, **lock.facts()}))
"""


def start(go: Path, label: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SECTION, str(go), label, str(hold)], stdout=subprocess.PIPE, text=True)


def test_two_timed_sections_started_together_do_not_overlap(tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [start(go, label, 0.8) for label in ("a", "b")]
    time.sleep(1.0)  # both interpreters up and polling for the signal
    go.touch()
    out = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    first, second = sorted(out, key=lambda r: r["enter"])
    assert first["exit"] <= second["enter"]  # never both inside at once
    assert first["wait_s"] < 0.5 and "waited_for" not in first
    assert second["wait_s"] > 0.5  # it waited for most of the first one's 0.8 s
    assert second["waited_for"]["label"] == first["label"] and second["waited_for"]["pid"] == procs[["a", "b"].index(first["label"])].pid
    assert second["path"] == os.environ["HEADLINE_BENCH_TIMING_LOCK"]


def test_a_process_started_by_the_holder_does_not_wait_for_it(tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    with timed_section("outer") as outer:
        assert os.environ[HELD_ENV] == str(os.getpid())
        child = subprocess.run([sys.executable, "-c", SECTION, str(go), "inner", "0"], capture_output=True, text=True, timeout=60)
    inner = json.loads(child.stdout)
    assert outer.wait_s == 0 and inner["held_by_parent"] == os.getpid() and inner["wait_s"] == 0
    assert HELD_ENV not in os.environ  # released: the next process waits for nobody


def test_a_stale_held_variable_does_not_skip_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HELD_ENV left over from a holder that is gone (a shell that exported it): the section still waits for the real holder."""
    go = tmp_path / "go"
    holder = start(go, "holder", 0.8)
    go.touch()
    time.sleep(0.3)  # the holder is inside
    monkeypatch.setenv(HELD_ENV, "999999")
    waiter = start(go, "waiter", 0)
    out = json.loads(waiter.communicate(timeout=60)[0])
    held = json.loads(holder.communicate(timeout=60)[0])
    assert "held_by_parent" not in out and out["wait_s"] > 0.2 and out["enter"] >= held["exit"]


def test_generate_waits_for_the_timing_lock_and_records_the_wait(models_dir: Path, tmp_path: Path) -> None:
    """A timed section of another process holds the lock: generate() loads its model meanwhile, then waits before its
    warm-up, and perf.json says how long and for whom."""
    from test_generate import BASE_PARAMS, ROWS

    from headline_bench.benchmark import generate
    from headline_bench.measure.records import Perf, assemble
    from headline_bench.measure.timing_lock import holder, lock_path
    from headline_bench.settings import parse

    go = tmp_path / "go"
    other = start(go, "other bench", 2.0)
    go.touch()
    while not (holder(lock_path()) or {}).get("label"):
        time.sleep(0.01)
    _, perf = generate("kv_cache", parse(BASE_PARAMS), ROWS[:1])
    other.communicate(timeout=60)
    assert perf["timing_lock_wait_s"] > 0 and perf["timing_lock"]["label"] == "generate kv_cache"
    assert perf["timing_lock"]["waited_for"]["pid"] == other.pid and perf["timing_lock"]["waited_for"]["label"] == "other bench"
    assert assemble(Perf, perf) == perf  # declared fields of the one perf.json definition


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes any file: there is no read-only case")
def test_a_lock_file_without_write_permission_still_excludes(tmp_path: Path) -> None:
    """Another user's lock file (here: read-only): the lock still holds, only the holder line is missing."""
    path = Path(os.environ["HEADLINE_BENCH_TIMING_LOCK"])
    path.touch()
    path.chmod(0o444)
    go = tmp_path / "go"
    holder = start(go, "read-only holder", 0.8)
    go.touch()
    time.sleep(0.3)
    with timed_section("second") as second:
        pass
    first = json.loads(holder.communicate(timeout=60)[0])
    assert second.wait_s > 0.2 and second.waited_for is None and path.read_text() == "" and first["wait_s"] < 0.2
