"""scripts/results_summary.py: a quality-run folder's summary.json and report.md copy its committed files, nothing else."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_summary", ROOT / "scripts" / "results_summary.py")
results_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_summary)

ENV = {"device": "cpu (Test CPU, 2 cores)", "torch": "9.9", "transformers": "8.8", "engine": "transformers 8.8"}


def _folder(tmp_path: Path, rescored: bool) -> Path:
    (tmp_path / "run.txt").write_text("command: scripts/quality-run t 40 float32 quant8\ncommit: abc123\nquality quant8: 5 s\n")
    score = {"technique": "quant8", "rows": 40, "rougeL": 0.2, "rougeL_baseline": 0.21, "rougeL_delta": -0.0123,
             "rougeL_delta_low": -0.0301, "rougeL_delta_high": 0.0055, "interval_level": 0.99, "quality_state": "inconclusive",
             "rows_to_decide": 120, "rows_to_decide_state": "non-inferior"}
    (tmp_path / "score-quant8.json").write_text(json.dumps(score))
    (tmp_path / "quality-quant8.json").write_text(json.dumps({"wall_s": 5.5, "resume": {"session_envs": [{"env": ENV}, {"env": ENV}]}}))
    if rescored:
        (tmp_path / "rescored.json").write_text(json.dumps({"rule": "verdicts now", "min_rows": 400, "rescored": [
            {"technique": "quant8", "state": "too few rows", "note": None, "final": True, "rows_to_decide": 400,
             "rows_to_decide_state": "non-inferior"}]}))
    return tmp_path


def test_summary_copies_the_committed_numbers_and_the_rescored_state(tmp_path: Path) -> None:
    folder = _folder(tmp_path, rescored=True)
    results_summary.main(["x", str(folder)])
    s = json.loads((folder / "summary.json").read_text())
    assert s["command"].startswith("scripts/quality-run") and s["commit"] == "abc123"
    assert s["environments"] == [ENV]  # one fingerprint, however many sessions recorded it
    t = s["techniques"]["quant8"]
    assert (t["rougeL_delta"], t["rougeL_delta_low"], t["quality_wall_s"]) == (-0.0123, -0.0301, 5.5)
    assert (t["quality_state"], t["state_now"], t["rows_to_decide_now"]) == ("inconclusive", "too few rows", 400)
    md = (folder / "report.md").read_text()
    assert "[-0.0301, +0.0055]" in md and "too few rows" in md and "abc123" in md and "torch 9.9" in md


def test_without_rescored_json_the_state_is_labelled_as_scored(tmp_path: Path) -> None:
    folder = _folder(tmp_path, rescored=False)
    results_summary.main(["x", str(folder)])
    assert json.loads((folder / "summary.json").read_text())["rule_now"] is None
    assert "inconclusive (as scored; not re-judged)" in (folder / "report.md").read_text()
