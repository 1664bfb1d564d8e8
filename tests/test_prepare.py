"""prepare: sampling, cleaning and every bad input gives a one-line error naming the file or row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from headline_bench.data.prepare import prepare, read_source
from headline_bench.errors import InputError
from headline_bench.files import read_jsonl

ROWS = [{"id": i, "summary": f"summary {i}", "headline": f"headline {i}"} for i in range(10)]


def test_sample_is_deterministic_and_sized() -> None:
    a, counts = prepare(ROWS, "summary", "headline", n=4, seed=1, shuffle=True, id_column="id")
    b, _ = prepare(ROWS, "summary", "headline", n=4, seed=1, shuffle=True, id_column="id")
    assert a == b and len(a) == 4
    assert counts == {"rows_read": 10, "dropped_empty": 0, "dropped_duplicate_id": 0, "rows_valid": 10, "rows_requested": 4, "rows_sampled": 4}
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


def test_undecodable_byte_names_file_line_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"id": 1, "summary": "caf\xe9 opens", "headline": "h"}\n')
    with pytest.raises(InputError, match=r"latin.jsonl:2: byte\(s\) e9 are not utf-8; set prepare.encoding \(this line reads as cp1252\)"):
        read_source(str(path))
    assert read_source(str(path), encoding="latin-1")[1]["summary"] == "caf\u00e9 opens"
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"id,summary,headline\n1,ok,h\n2,caf\xe9,h\n")
    with pytest.raises(InputError, match=r"latin.csv:3: byte\(s\) e9 are not utf-8"):
        read_source(str(csv))
    assert read_source(str(csv), encoding="cp1252")[1]["summary"] == "caf\u00e9"


def test_duplicate_ids_name_both_rows_unless_deduped() -> None:
    rows = ROWS[:3] + [{"id": 1, "summary": "another story", "headline": "other"}]
    with pytest.raises(InputError, match=r"f: rows 2 and 4 share the id '1'; fix the data or set prepare.dedupe: true"):
        prepare(rows, "summary", "headline", n=10, seed=0, shuffle=False, source="f", id_column="id")
    sample, counts = prepare(rows, "summary", "headline", n=10, seed=0, shuffle=False, source="f", id_column="id", dedupe=True)
    assert [r["summary"] for r in sample] == ["summary 0", "summary 1", "summary 2"] and counts["dropped_duplicate_id"] == 1


@pytest.mark.parametrize(("value", "shown"), [(12345, "int ('12345')"), (["a", "b"], "list"), ({"t": 1}, "dict"), (True, "bool")])
def test_non_text_summary_or_headline_names_the_row(value: object, shown: str) -> None:
    rows = ROWS[:2] + [{"id": 7, "summary": value, "headline": "h"}]
    with pytest.raises(InputError, match=r"f: row 3: summary \(summary\) is " + re.escape(shown)):
        prepare(rows, "summary", "headline", n=10, seed=0, shuffle=False, source="f", id_column="id")
    rows = ROWS[:1] + [{"id": 7, "summary": "s", "headline": value}]
    with pytest.raises(InputError, match=r"f: row 2: headline \(headline\) is"):
        prepare(rows, "summary", "headline", n=10, seed=0, shuffle=False, source="f", id_column="id")


def test_a_row_that_is_not_an_object_is_named() -> None:
    with pytest.raises(InputError, match=r"f: row 2 is list, not an object with named columns"):
        prepare([ROWS[0], ["a", "b"]], "summary", "headline", n=2, seed=0, shuffle=False, source="f")


def test_numeric_looking_csv_cells_stay_text(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("id,summary,headline\n1,12345,67\n")
    assert read_source(str(tmp_path / "d.csv"))[0] == {"id": "1", "summary": "12345", "headline": "67"}


def test_headerless_csv_gets_a_hint_and_reads_by_position(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    path.write_text("Council votes to freeze taxes for two years,Council Freezes Taxes\nA bakery raises pay,Bakery Raises Pay\n")
    rows = read_source(str(path))
    with pytest.raises(InputError, match=r"missing column\(s\) \['summary', 'headline'\].*set prepare.header: none and give prepare.summary_column"):
        prepare(rows, "summary", "headline", n=5, seed=0, shuffle=False, source=str(path))
    rows = read_source(str(path), header="none")
    sample, counts = prepare(rows, 0, 1, n=5, seed=0, shuffle=False, source=str(path))
    assert sample[0] == {"id": "row00000", "summary": "Council votes to freeze taxes for two years", "reference": "Council Freezes Taxes"}
    assert counts["rows_sampled"] == 2


def test_empty_file_header_only_and_missing_file(tmp_path: Path) -> None:
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(InputError, match=f"{name}: empty file"):
            read_source(str(tmp_path / name))
    (tmp_path / "head.csv").write_text("id,summary,headline\n")
    with pytest.raises(InputError, match=r"head.csv: header row only, no data rows"):
        read_source(str(tmp_path / "head.csv"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match=r"blank.jsonl: no rows"):
        prepare(read_source(str(tmp_path / "blank.jsonl")), "summary", "headline", n=2, seed=0, shuffle=False, source=str(tmp_path / "blank.jsonl"))
    with pytest.raises(InputError, match="source file not found"):
        read_source(str(tmp_path / "missing.jsonl"))


def test_n_larger_than_the_data_keeps_all_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    sample, counts = prepare(ROWS, "summary", "headline", n=50, seed=0, shuffle=False, id_column="id")
    assert len(sample) == 10 and counts["rows_requested"] == 50 and counts["rows_sampled"] == 10
    assert "prepare.n is 50 but only 10 valid rows exist" in caplog.text


def test_n_zero_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="prepare.n is 0: at least one row is needed"):
        prepare(ROWS, "summary", "headline", n=0, seed=0, shuffle=False)


def test_metrics_name_the_source_as_params_give_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "params.yaml").write_text(
        "base: {seed: 1}\nprepare: {source: data/d.jsonl, summary_column: summary, headline_column: headline, id_column: id, n: 50, shuffle: false}\n"
    )
    stage = Path(__file__).resolve().parents[1] / "stages" / "prepare.py"
    out = subprocess.run([sys.executable, str(stage)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert metrics["source"] == "data/d.jsonl" and metrics["rows_sampled"] == 10 and metrics["rows_requested"] == 50
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr
