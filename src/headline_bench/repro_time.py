"""`dvc repro` with each stage's wall time: metrics/repro_time.json, so README states a measured time, never a typed one.

Why a wrapper: DVC records no stage durations, and the project's promise "the full `dvc repro` stays within N minutes on
the 2-core machine" needs one run's per-stage times next to the machine and commit that produced them. The wrapper runs
`dvc repro` unchanged (its arguments passed through), echoes its output, stamps every "Running stage" line and writes
the durations (a stage's time runs until the next stage starts or dvc exits), the stages dvc skipped, the exit code and
the environment fingerprint. scripts/glance puts the total into README's generated block.

Usage (from the repository root): scripts/repro-timed [dvc repro arguments]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

OUT = Path("metrics/repro_time.json")
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")  # unchanged, or restored from the run cache


# dvc's own lines around a stage's command (the command echo, empty-output warnings, lock updates, hints)
DVC_LINE = re.compile(r"^\s*$|^> |^WARNING: '|^Updating lock file|^To track the changes|^\s+git add|^Use `dvc push`|^Stage '")


def stage_name(addressing: str) -> str:
    """dvc's address of a stage without its file: 'pipelines/generate/dvc.yaml:generate@kv_cache' -> 'generate@kv_cache'."""
    return addressing.rpartition(":")[2]


def stage_times(lines: list[tuple[float, str]], end: float) -> tuple[list[dict[str, Any]], list[str]]:
    """(stamp, line) pairs of dvc's output -> each stage that ran with its seconds, and the stages dvc skipped.

    Each stage also gets `dvc_s`: from its command's last line of output to the stage's end, the time dvc spends on
    it (saving outputs, rewriting dvc.lock, checking the next stage); the command's own exit is inside it too.
    """
    starts = [(i, t, stage_name(m.group(1))) for i, (t, line) in enumerate(lines) if (m := RUNNING.search(line))]
    skipped = [stage_name(m.group(1)) for _, line in lines if (m := SKIPPED.search(line))]
    ran = []
    for k, (i, t, name) in enumerate(starts):
        stop_i, stop = (starts[k + 1][0], starts[k + 1][1]) if k + 1 < len(starts) else (len(lines), end)
        own = [s for s, line in lines[i + 1 : stop_i] if not DVC_LINE.search(line)]
        ran.append({"stage": name, "s": round(stop - t, 1), "dvc_s": round(stop - (own[-1] if own else t), 1)})
    return ran, skipped


def group_totals(ran: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage group (generate@baseline and generate@quant4 -> generate), in the order they first ran."""
    totals: dict[str, float] = {}
    for r in ran:
        group = r["stage"].split("@")[0]
        totals[group] = round(totals.get(group, 0.0) + r["s"], 1)
    return totals


def commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+uncommitted changes" if dirty else "")


def run(args: list[str], echo: TextIO = sys.stdout) -> dict[str, Any]:
    """Run `dvc repro ARGS`, echo its output with a clock time per line, return the timing record."""
    from headline_bench.measure.environment import env_info, fingerprint

    started, code = datetime.now(UTC).isoformat(timespec="seconds"), commit()  # the code as it was when the run began
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            lines.append((now, line))
            echo.write(f"[{time.strftime('%H:%M:%S')}] {line}")
            echo.flush()
    end = time.monotonic()
    ran, skipped = stage_times(lines, end)
    return {"command": " ".join(["dvc", "repro", *args]), "commit": code, "started_at": started, "exit_code": proc.returncode,
            "total_s": round(end - t0, 1), "groups_s": group_totals(ran), "dvc_s": round(sum(r["dvc_s"] for r in ran), 1),
            "stages": ran, "skipped": skipped,
            "complete": proc.returncode == 0 and not skipped,
            "env": fingerprint(env_info())}


def main(argv: list[str] | None = None) -> int:
    record = run(sys.argv[1:] if argv is None else argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"dvc repro: exit {record['exit_code']}, {record['total_s'] / 60:.1f} min; per stage group: "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in record["groups_s"].items()) + f" -> {OUT}", file=sys.stderr)
    return int(record["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
