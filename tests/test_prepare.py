"""prepare: sampling, cleaning and every bad input gives a one-line error naming the file or row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import InputError, read_jsonl
from prepare import prepare, read_source

ROWS = [{"id": i, "summary": f"summary {i}", "headline": f"headline {i}"} for i in range(10)]


def test_sample_is_deterministic_and_sized() -> None:
    a, counts = prepare(ROWS, "summary", "headline", n=4, seed=1, shuffle=True, id_column="id")
    b, _ = prepare(ROWS, "summary", "headline", n=4, seed=1, shuffle=True, id_column="id")
    assert a == b and len(a) == 4
    assert counts == {"rows_read": 10, "dropped_empty": 0, "rows_valid": 10, "rows_sampled": 4}
    head, _ = prepare(ROWS, "summary", "headline", n=2, seed=1, shuffle=False, id_column="id")
    assert [r["id"] for r in head] == ["0", "1"]
    assert set(head[0]) == {"id", "summary", "reference"}


def test_empty_summaries_are_counted_not_silent() -> None:
    rows = ROWS[:3] + [{"id": 99, "summary": "  ", "headline": "h"}, {"id": 98, "summary": None, "headline": "h"}]
    sample, counts = prepare(rows, "summary", "headline", n=10, seed=0, shuffle=False, id_column="id")
    assert len(sample) == 3 and counts["dropped_empty"] == 2


def test_missing_column_names_file_and_columns() -> None:
    with pytest.raises(InputError, match=r"data.jsonl: missing column\(s\) \['short_description'\]"):
        prepare(ROWS, "short_description", "headline", n=2, seed=0, shuffle=False, source="data.jsonl")


def test_zero_rows_after_filtering() -> None:
    with pytest.raises(InputError, match="zero rows left after dropping 1"):
        prepare([{"summary": "", "headline": "x"}], "summary", "headline", n=2, seed=0, shuffle=False, source="f")


def test_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl:2: broken JSON line"):
        read_jsonl(path)


def test_csv_and_parquet_sources(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    assert read_source(str(tmp_path / "d.csv"))[3]["summary"] == "summary 3"
    assert read_source(str(tmp_path / "d.parquet"))[3]["headline"] == "headline 3"
    with pytest.raises(InputError, match="source file not found"):
        read_source(str(tmp_path / "missing.csv"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type"):
        read_source(str(tmp_path / "d.txt"))


def test_shared_news_category_columns() -> None:
    """The real data set that benchmarks use, read in place (never copied into the repo)."""
    path = Path(__file__).resolve().parents[2] / "shared/data/news_category/news_category_v3_head5000.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    sample, counts = prepare(read_source(str(path)), "short_description", "headline", n=100, seed=0, shuffle=False)
    assert counts["rows_read"] == 5000 and len(sample) == 100
    assert counts["rows_valid"] + counts["dropped_empty"] == 5000


def test_main_exits_with_one_line_error(tmp_path: Path) -> None:
    """The stage's CLI turns bad input into a single 'error:' line and a non-zero exit, no traceback."""
    (tmp_path / "params.yaml").write_text(
        "base: {seed: 1}\nprepare: {source: missing.jsonl, summary_column: s, headline_column: h, n: 2, shuffle: false}\n"
    )
    stage = Path(__file__).resolve().parents[1] / "stages" / "prepare.py"
    out = subprocess.run([sys.executable, str(stage)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: missing.jsonl: source file not found"
