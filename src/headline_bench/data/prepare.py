"""Read the source data set and write a clean, deterministic sample."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from headline_bench.errors import InputError
from headline_bench.files import read_jsonl, undecodable
from headline_bench.logs import log

HUB_PREFIX = "hub:"


def read_source(source: str, split: str = "train", encoding: str = "utf-8", header: str = "first_row") -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or of a Hugging Face hub data set ("hub:<id>").

    Args:
        source: a path to .jsonl/.json/.csv/.parquet, or "hub:<dataset id>".
        split: the split to load for hub data sets.
        encoding: text encoding of JSONL/CSV files (prepare.encoding).
        header: "first_row", or "none" for a CSV without a header row: columns are then positions 0, 1, ...
    """
    if source.startswith(HUB_PREFIX):
        from datasets import load_dataset  # needs the hub: users have it, this workplace does not

        return list(load_dataset(source[len(HUB_PREFIX) :], split=split))
    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: source file not found")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise InputError(f"{source}: empty file")
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, encoding)
    import pandas as pd

    try:
        if suffix == ".csv":
            # every cell as text: a summary "12345" stays text, as it is in the file; empty cells become None
            frame = pd.read_csv(path, encoding=encoding, dtype=str, header=None if header == "none" else "infer")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise InputError(f"{source}: unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)")
    except UnicodeDecodeError as e:
        raise InputError(first_undecodable(path, encoding) or f"{source}: not {encoding} ({e.reason})") from None
    except InputError:
        raise
    except Exception as e:  # pandas raises many types for broken files
        raise InputError(f"{source}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if frame.empty and len(frame.columns):
        raise InputError(f"{source}: header row only, no data rows (columns {list(frame.columns)})")
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def first_undecodable(path: Path, encoding: str) -> str | None:
    """`file:line` of the first line that is not `encoding`, with the encoding that reads it."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                return undecodable(path, i, raw, e, encoding)
    return None


def header_hint(source: str) -> str:
    """For a CSV whose 'column names' look like a data row: how to read it without a header."""
    if not source.lower().endswith(".csv"):
        return ""
    return ("; if the file has no header row (the names above look like data), set prepare.header: none and give "
            "prepare.summary_column / headline_column as positions (0, 1, ...)")


def text(value: Any, what: str, where: str) -> str:
    """A summary or headline as text; None is empty (dropped and counted), anything else that is not text is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: {what} is {type(value).__name__} ({str(value)[:40]!r}), not text")
    return value.strip()


def prepare(
    rows: list[dict[str, Any]],
    summary_column: str,
    headline_column: str,
    n: int,
    seed: int,
    shuffle: bool,
    source: str = "",
    id_column: str | int | None = None,
    dedupe: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Validate, clean and sample rows into {id, summary, reference}.

    Rows with an empty summary or headline are dropped and counted, never silently. Ids must be unique,
    because scoring pairs techniques' rows by id: a repeated id is an error naming both rows, unless
    `dedupe` keeps the first and counts the others. Rows are numbered from 1 in messages.

    Returns:
        The sampled rows and the counts of what was read, dropped and kept.
    """
    if n < 1:
        raise InputError(f"prepare.n is {n}: at least one row is needed")
    if not rows:
        raise InputError(f"{source}: no rows")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise InputError(f"{source}: row {bad + 1} is {type(rows[bad]).__name__}, not an object with named columns")
    missing = [c for c in (summary_column, headline_column) if c not in rows[0]]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; columns are {list(rows[0])}{header_hint(source)}")
    clean, empty, duplicates = [], 0, 0
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        summary = text(row.get(summary_column), f"summary ({summary_column})", where)
        headline = text(row.get(headline_column), f"headline ({headline_column})", where)
        if not summary or not headline:
            empty += 1
            continue
        row_id = str(row[id_column]) if id_column is not None and row.get(id_column) is not None else f"row{i:05d}"
        if row_id in first_row:
            if not dedupe:
                raise InputError(f"{source}: rows {first_row[row_id]} and {i + 1} share the id {row_id!r}; "
                                 "fix the data or set prepare.dedupe: true to keep the first")
            duplicates += 1
            continue
        first_row[row_id] = i + 1
        clean.append({"id": row_id, "summary": summary, "reference": headline})
    if not clean:
        raise InputError(f"{source}: zero rows left after dropping {empty} with an empty summary or headline")
    if shuffle:
        random.Random(seed).shuffle(clean)
    sample = clean[:n]
    if len(sample) < n:
        log.warning("prepare: prepare.n is %d but only %d valid rows exist: keeping all %d", n, len(clean), len(clean))
    counts = {"rows_read": len(rows), "dropped_empty": empty, "dropped_duplicate_id": duplicates, "rows_valid": len(clean),
              "rows_requested": n, "rows_sampled": len(sample)}
    return sample, counts
