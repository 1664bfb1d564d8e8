"""Markdown tables and number formatting: one helper for every report."""

from __future__ import annotations

from typing import Any

from headline_bench.analysis.stats import finite


def f(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if finite(v) else "—"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])
