"""summary.json and report.md for a quality-only results folder (scripts/quality-run), from its committed files only.

Why: a quality-run folder keeps each technique's score-*.json and quality-*.json, run.txt (command, commit) and, once
re-judged, rescored.json (scripts/rescore_scores.py), but no one file a reader or a script can take the results from.
This collects them without computing anything new: every number is copied from those files, and the state "now" is
rescored.json's where it exists (else the state recorded when the run was scored, labelled so).

Usage: python scripts/results_summary.py docs/results/decide-400   (writes <folder>/summary.json and report.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from headline_bench.render.markdown import f, table  # noqa: E402

KEYS = ("rows", "rougeL", "rougeL_baseline", "rougeL_delta", "rougeL_delta_low", "rougeL_delta_high", "interval_level",
        "interval_method", "quality_state", "quality_note", "rows_to_decide", "rows_to_decide_state")


def run_facts(folder: Path) -> dict[str, str]:
    """`key: value` lines of run.txt (command, commit, stage times); {} without it."""
    path = folder / "run.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines) if v}


def environments(folder: Path) -> list[dict]:
    """The distinct environment fingerprints the quality passes recorded (quality-*.json resume.session_envs)."""
    envs: list[dict] = []
    for path in sorted(folder.glob("quality-*.json")):
        for session in json.loads(path.read_text()).get("resume", {}).get("session_envs", []):
            if session.get("env") and session["env"] not in envs:
                envs.append(session["env"])
    return envs


def summarize(folder: Path) -> dict:
    """The folder's summary: run facts, environments and, per technique, its recorded numbers and today's state."""
    facts = run_facts(folder)
    rescored_path = folder / "rescored.json"
    rescored = json.loads(rescored_path.read_text()) if rescored_path.exists() else {}
    now = {r["technique"]: r for r in rescored.get("rescored", [])}
    techniques = {}
    for path in sorted(folder.glob("score-*.json")):
        score = json.loads(path.read_text())
        name = score["technique"]
        row = {k: score.get(k) for k in KEYS}
        quality = folder / f"quality-{name}.json"
        row["quality_wall_s"] = json.loads(quality.read_text()).get("wall_s") if quality.exists() else None
        if name in now:
            r = now[name]
            row |= {"state_now": r["state"], "state_now_note": r.get("note"), "state_now_final": r.get("final"),
                    "rows_to_decide_now": r.get("rows_to_decide"), "rows_to_decide_state_now": r.get("rows_to_decide_state")}
        techniques[name] = row
    return {"made_by": "scripts/results_summary.py from this folder's committed files (nothing recomputed)",
            "command": facts.get("command"), "commit": facts.get("commit"), "environments": environments(folder),
            "rule_now": {k: rescored[k] for k in ("rule", "min_rows") if k in rescored} or None,
            "techniques": techniques}


def report(summary: dict, folder: Path) -> str:
    """The summary as markdown: how it was made, where, and one row per technique."""
    envs = [", ".join(f"{k} {e[k]}" for k in ("device", "cpu_id", "cpu_isa", "platform", "torch", "transformers", "engine") if e.get(k))
            for e in summary["environments"]]
    rows = []
    for name, t in summary["techniques"].items():
        interval = f"[{f(t['rougeL_delta_low'], '+.4f')}, {f(t['rougeL_delta_high'], '+.4f')}]"
        state = t.get("state_now", t["quality_state"] if t["quality_state"] == "reference" else f"{t['quality_state']} (as scored; not re-judged)")
        if t.get("state_now_note"):
            state += f" ({t['state_now_note']})"
        need = t.get("rows_to_decide_now", t.get("rows_to_decide"))
        need_state = t.get("rows_to_decide_state_now", t.get("rows_to_decide_state"))
        rows.append([name, t["rows"], f(t["rougeL"], ".4f"), f(t["rougeL_delta"], "+.4f"), interval,
                     f(t.get("interval_level"), ".5g"), t["quality_state"], state, f"{need} ({need_state})" if need else "—"])
    header = ["technique", "rows", "ROUGE-L", "ΔROUGE-L", "interval", "level", "state as scored", "state now", "rows to decide"]
    return "\n".join([f"# {folder.name}: quality run", "",
                      f"- command: `{summary['command']}`", f"- commit: {summary['commit']}",
                      *(f"- environment: {e}" for e in envs),
                      f"- state now: rescored.json (scripts/rescore_scores.py; {summary['rule_now']['rule']}, score.min_rows {summary['rule_now'].get('min_rows')})"
                      if summary["rule_now"] else "- state now: not re-judged (no rescored.json)",
                      f"- made by: {summary['made_by']}", "", table(header, rows), ""])


def main(argv: list[str]) -> None:
    folder = Path(argv[1])
    summary = summarize(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "report.md").write_text(report(summary, folder))


if __name__ == "__main__":
    main(sys.argv)
