"""README's "results at a glance" block, written from the committed metrics so that no number in it is typed by hand.

Why a generated block: hand-typed results go stale with every run and every machine, and a reader cannot tell which
run a number came from. This module renders metrics/summary.json (and metrics/serving_report/summary.json where it
exists) into markdown that names the machine (summary.json's `env`) and the commit that last changed the metrics, and
replaces the text between the README's markers. tests/test_glance.py fails when README's block differs from what
this module renders, so CI checks that it is current.

Usage (from the repository root): scripts/glance --write README.md   (or --check README.md: exit 1 when stale)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from headline_bench.quality.divergence import FIDELITY_STATES
from headline_bench.render.markdown import f, table

START, END = "<!-- glance:start -->", "<!-- glance:end -->"
SUMMARY = Path("metrics/summary.json")
SERVING = Path("metrics/serving_report/summary.json")
REPRO_TIME = Path("metrics/repro_time.json")  # scripts/repro-timed: the run's per-stage wall times


def metrics_commit(root: Path, path: Path = SUMMARY) -> str:
    """The commit that last changed `path` (12 hex digits), or why it cannot be named (no git, shallow, uncommitted)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        if git("rev-parse", "--is-shallow-repository") == "true":
            return "unknown (shallow clone)"
        if git("status", "--porcelain", "--", str(path)):
            return "uncommitted changes"
        sha = git("log", "-1", "--format=%H", "--", str(path))
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git history)"
    return sha[:12] or "uncommitted"


def machine_line(env: dict[str, Any]) -> str:
    """One line naming the machine and versions a run measured on (summary.json `env`)."""
    parts = [env.get("device"), env.get("cpu_id"), env.get("cpu_isa") and f"ISA {env['cpu_isa']}",
             env.get("torch") and f"torch {env['torch']}", env.get("transformers") and f"transformers {env['transformers']}",
             env.get("torch_threads") and f"{env['torch_threads']} torch threads"]
    return ", ".join(str(p) for p in parts if p)


def _ms(v: Any) -> str:
    return f(v * 1000 if isinstance(v, (int, float)) else None, ".1f")


def _delta(t: dict[str, Any]) -> str:
    if t.get("rougeL_delta_low") is None or t.get("rougeL_delta_high") is None:
        return "—"
    return f"{f(t.get('rougeL_delta'), '+.3f')} [{f(t['rougeL_delta_low'], '+.3f')}, {f(t['rougeL_delta_high'], '+.3f')}]"


def techniques_table(techniques: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The per-technique table and the lines for techniques that were skipped or failed."""
    rows, missing = [], []
    for name, t in techniques.items():
        reason = t.get("skipped") or t.get("failed")
        if reason:
            missing.append(f"`{name}` ({'skipped' if t.get('skipped') else 'failed'}: {str(reason).splitlines()[0]})")
            continue
        rows.append([f"`{name}`", _ms(t.get("s_per_token")), _ms(t.get("tpot_s_p50")), f(t.get("tokens_per_s"), ".1f"),
                     f(t.get("peak_memory_mb"), ".0f"), f(t.get("rougeL"), ".3f"), _delta(t), t.get("quality_state") or "—",
                     t.get("fidelity_state") if t.get("fidelity_state") in FIDELITY_STATES else "—"])
    header = ["technique", "ms/token", "TPOT p50 ms", "tokens/s", "peak MB", "ROUGE-L", "ΔROUGE-L [interval]", "ROUGE state", "fidelity state"]
    return table(header, rows), missing


def serving_lines(serving: dict[str, Any]) -> list[str]:
    """One line per serving entry: its sustainable rate, its served quality state against its offline reference and
    whether that makes it eligible for the online pick; then the pick."""
    lines = []
    for e in serving.get("entries", []):
        if e.get("status") != "ran":
            lines.append(f"- `{e['entry']}`: {e.get('status')} ({str(e.get('reason') or e.get('failed') or '').splitlines()[0] if (e.get('reason') or e.get('failed')) else ''})")
            continue
        rate = e.get("sustainable_rate") or {}
        r = {"measured": f"{f(rate.get('rate'), 'g')} req/s", "at least": f">= {f(rate.get('rate'), 'g')} req/s",
             "below": "below the lowest rate tried"}.get(rate.get("bound"), "n/a")
        sq = e.get("served_quality") or {}
        state = sq.get("quality_state") or "none"
        bound = (e.get("client_check") or {}).get("client_bound_levels") or []
        lines.append(f"- `{e['entry']}`: sustainable {r}; served quality {state} vs `{e.get('offline_reference')}`"
                     + (f"; not eligible ({e['ineligible']})" if e.get("ineligible") else "; eligible")
                     + (f"; client-bound levels: {', '.join(map(str, bound))}" if bound else ""))
    rec = serving.get("recommendation") or {}
    lines.append(f"- online-serving pick: `{rec['choice']}` (served quality {rec.get('eligible_by')})" if rec.get("choice")
                 else f"- online-serving pick: none ({rec.get('note') or 'no entry qualified'})")
    return lines


def read_speed(techniques: dict[str, Any]) -> str:
    """The memory read rate the run's timed processes measured on a CPU (median over techniques), as a clause; "" without one.

    Why beside the wall time: a shared 2-core VM's speed changes from hour to hour (the same CPU model read 20-23 GB/s in
    one full run and 17-19 GB/s in the next, with tokens/s 0.6-0.8x), so two runs' totals compare only with it."""
    rates = [t["peak_bandwidth_gbs"] for t in techniques.values()
             if str(t.get("peak_bandwidth_source", "")).startswith("measured") and isinstance(t.get("peak_bandwidth_gbs"), (int, float))]
    if not rates:
        return ""
    return f"; memory read rate measured by its timed processes: median {statistics.median(rates):.1f} GB/s over {len(rates)} techniques"


def repro_line(record: dict[str, Any], speed: str = "") -> str:
    """The run's measured `dvc repro` time, per stage group, from scripts/repro-timed's record (`speed`: read_speed's clause)."""
    groups = ", ".join(f"{k} {v / 60:.1f}" for k, v in (record.get("groups_s") or {}).items())
    whole = "complete" if record.get("complete") else f"exit {record.get('exit_code')}, skipped stages: {len(record.get('skipped') or [])}"
    env = record.get("env") or {}
    return (f"`{record.get('command')}` took {record.get('total_s', 0) / 60:.1f} min ({whole}) on {env.get('device') or 'an unnamed machine'}"
            f"{', ' + env['cpu_id'] if env.get('cpu_id') else ''}{speed}; minutes per stage group: {groups} (`{REPRO_TIME}`).")


def render(root: Path, commit: str | None = None) -> str:
    """The block's markdown (markers excluded) from the committed metrics under `root` (`commit`: metrics_commit's)."""
    s = json.loads((root / SUMMARY).read_text())
    prep = s.get("prepare", {})
    out = [f"<!-- generated by scripts/glance from {SUMMARY} and {SERVING}; edit those, not this -->",
           f"From `{SUMMARY}` (commit {commit or metrics_commit(root)}): {machine_line(s.get('env', {}))}; "
           f"{prep.get('quality_rows', '?')} quality rows, {prep.get('timed_rows', '?')} timed rows. ROUGE states are "
           "the score stage's, fidelity states the fidelity stage's (teacher-forced KL to baseline, docs/methods.md); "
           "ms/token = mean latency / mean new tokens.", ""]
    if (root / REPRO_TIME).exists():
        out += [repro_line(json.loads((root / REPRO_TIME).read_text()), read_speed(s.get("techniques", {}))), ""]
    tab, missing = techniques_table(s.get("techniques", {}))
    out += [tab, ""]
    if missing:
        out += ["Not measured on this machine: " + "; ".join(missing) + ".", ""]
    if s.get("environment_warning"):
        out += [f"Note: {s['environment_warning']}.", ""]
    picks = [f"{r['scenario']}: `{r['choice']}`" for r in s.get("recommendations", []) if r.get("choice")]
    if picks:
        out += ["Picks: " + "; ".join(picks) + ".", ""]
    if (root / SERVING).exists():
        out += [f"Serving (`{SERVING}`):", *serving_lines(json.loads((root / SERVING).read_text())), ""]
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the markers replaced by `block`; the markers must each appear once."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} block")
    head, rest = text.split(START)
    return f"{head}{START}\n{block}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (metrics/ lives there)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path, help="replace the block in this file")
    g.add_argument("--check", type=Path, help="exit 1 if this file's block is not current")
    a = p.parse_args(argv)
    target = a.write or a.check
    text = target.read_text()
    new = replace_block(text, render(a.root))
    if a.check:
        if new != text:
            print(f"error: {target}: the results block is stale; run scripts/glance --write {target}", file=sys.stderr)
            return 1
        return 0
    target.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
