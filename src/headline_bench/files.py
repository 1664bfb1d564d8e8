"""Where the pipeline's files live and how they are read and written (JSON, JSON Lines)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from headline_bench.errors import InputError, fail

ROOT = Path(__file__).resolve().parents[2]  # the repository (the package is installed editable from src/)
PACKAGE = Path(__file__).resolve().parent


PARAMS = Path("params.yaml")


PREPARED = Path("data/prepared")
QUALITY_ROWS = PREPARED / "quality.jsonl"  # prepare.n rows: generated once per lossy technique and scored
TIMED_ROWS = PREPARED / "timed.jsonl"      # the first prepare.timed_rows of them: timed in every technique's processes


MODELS = Path("data/models")


GENERATIONS = Path("data/generations")  # the timed pass's records (data/prepared/timed.jsonl)
QUALITY = Path("data/quality")          # the quality pass's records (data/prepared/quality.jsonl)
LOSSLESS = Path("data/lossless")        # the lossless check's further rows (untimed, as timed) of lossless techniques and their references
FIDELITY = Path("data/fidelity")        # teacher-forced fidelity: baseline's stored distributions and each technique's rows


METRICS = Path("metrics")


TECHNIQUE_METRICS = METRICS / "techniques"
SERVING_METRICS = METRICS / "serving"
SERVING_REPORT = METRICS / "serving_report"
SERVED = Path("data/served")


UNFINISHED = ("failed", "skipped", "not_run")  # keys of a metrics file that records no finished measurement


def finished(data: Path, metrics: Path) -> bool:
    """`metrics` records a finished measurement (no failure, skip or not-run) and `data` holds its rows."""
    try:
        old = read_json(metrics)
    except (OSError, ValueError):
        return False
    return not any(key in old for key in UNFINISHED) and data.exists() and data.stat().st_size > 0


def keep_finished(what: str, result: dict[str, Any], data: Path, metrics: Path) -> None:
    """Stop the stage (non-zero exit) when `result` is a failure or a skip and `data`/`metrics` hold a finished
    measurement. Why: the outputs are `persist: true`, so DVC leaves them in place; a recorded failure or skip written
    over them would lose the last good numbers (a broken package or engine, not the technique, is often the cause),
    and an exit 0 would make dvc.lock pair the old outputs with the new settings. With nothing finished to keep, the
    caller records the failure or skip and exits 0, so the report shows it and the other stages run."""
    reason = result.get("failed") or result.get("skipped")
    if reason and finished(data, metrics):
        kind = "failed" if result.get("failed") else "skipped"
        fail(f"{what} {kind}: {str(reason).splitlines()[0]}; its last finished outputs ({data}, {metrics}, measured "
             f"{read_json(metrics).get('started_at', 'earlier')}) are kept and the stage fails, so dvc.lock does not pair them "
             f"with these settings (delete them to record this outcome instead)")


def read_jsonl(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read JSON Lines; a broken line or undecodable bytes are an InputError naming file and line, not a traceback."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise InputError(undecodable(path, i, raw, e, encoding)) from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: broken JSON line ({e.msg})") from None
    return rows


def undecodable(path: Path, line: int, raw: bytes, error: UnicodeDecodeError, encoding: str) -> str:
    """The one-line message for bytes that are not `encoding`, with the encoding that reads them."""
    bad = raw[error.start : error.end]
    guess = next((enc for enc in ("utf-8", "cp1252", "latin-1") if enc != encoding and _decodes(raw, enc)), "latin-1")
    return f"{path}:{line}: byte(s) {bad.hex(' ')} are not {encoding}; set prepare.encoding (this line reads as {guess})"


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
