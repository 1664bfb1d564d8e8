"""Prepare: read the source data set (local JSONL/CSV/Parquet or a hub id), clean it and write a
deterministic sample to data/prepared/test.jsonl, with counts in metrics/prepare.json."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from common import METRICS, PREPARED, InputError, fail, load_params, log, read_jsonl, setup_logging, write_json, write_jsonl

HUB_PREFIX = "hub:"


def read_source(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or of a Hugging Face hub data set ("hub:<id>").

    Args:
        source: a path to .jsonl/.json/.csv/.parquet, or "hub:<dataset id>".
        split: the split to load for hub data sets.
    """
    if source.startswith(HUB_PREFIX):
        from datasets import load_dataset  # needs the hub: users have it, this workplace does not

        return list(load_dataset(source[len(HUB_PREFIX) :], split=split))
    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: source file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    import pandas as pd

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path) if suffix == ".parquet" else None
    except Exception as e:  # pandas raises many types for broken files
        raise InputError(f"{source}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if frame is None:
        raise InputError(f"{source}: unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)")
    return frame.where(frame.notna(), None).to_dict("records")


def prepare(
    rows: list[dict[str, Any]],
    summary_column: str,
    headline_column: str,
    n: int,
    seed: int,
    shuffle: bool,
    source: str = "",
    id_column: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Validate, clean and sample rows into {id, summary, reference}.

    Rows with an empty summary or headline are dropped and counted, never silently.

    Returns:
        The sampled rows and the counts of what was read, dropped and kept.
    """
    if not rows:
        raise InputError(f"{source}: no rows")
    missing = [c for c in (summary_column, headline_column) if c not in rows[0]]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; columns are {sorted(rows[0])}")
    clean, empty = [], 0
    for i, row in enumerate(rows):
        summary = str(row.get(summary_column) or "").strip()
        headline = str(row.get(headline_column) or "").strip()
        if not summary or not headline:
            empty += 1
            continue
        row_id = str(row[id_column]) if id_column and row.get(id_column) is not None else f"row{i:05d}"
        clean.append({"id": row_id, "summary": summary, "reference": headline})
    if not clean:
        raise InputError(f"{source}: zero rows left after dropping {empty} with an empty summary or headline")
    if shuffle:
        random.Random(seed).shuffle(clean)
    sample = clean[:n]
    counts = {"rows_read": len(rows), "dropped_empty": empty, "rows_valid": len(clean), "rows_sampled": len(sample)}
    return sample, counts


def main() -> None:
    setup_logging()
    params = load_params()
    p = params["prepare"]
    try:
        rows = read_source(p["source"], p.get("split", "train"))
        sample, counts = prepare(
            rows, p["summary_column"], p["headline_column"], p["n"], params["base"]["seed"], p["shuffle"],
            source=p["source"], id_column=p.get("id_column"),
        )
    except InputError as e:
        fail(str(e))
    write_jsonl(PREPARED / "test.jsonl", sample)
    write_json(METRICS / "prepare.json", {"source": p["source"], **counts})
    log.info("prepare: %s -> %s (%s)", p["source"], PREPARED / "test.jsonl", counts)


if __name__ == "__main__":
    main()
