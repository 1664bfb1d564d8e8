"""ROUGE through `evaluate`, with the metric module kept in the repo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROUGE_MODULE = str(Path(__file__).resolve().parent / "headline_rouge")


TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def rouge(predictions: list[str], references: list[str], seed: int, per_row: bool = False) -> dict[str, Any]:
    """ROUGE through `evaluate` with the repo's metric module; aggregated with CI, or per row."""
    import evaluate

    metric = evaluate.load(ROUGE_MODULE)
    if per_row:
        return metric.compute(predictions=predictions, references=references, use_aggregator=False)
    return metric.compute(predictions=predictions, references=references, return_ci=True, seed=seed)


def row_scores(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-row F-measures {id: [rouge1, rouge2, rougeL, rougeLsum]}; a row set aside (no prediction) scores 0."""
    scored = [r for r in records if r.get("prediction") is not None]
    per_row = rouge([r["prediction"] for r in scored], [r["reference"] for r in scored], 0, per_row=True) if scored else {}
    out = {r["id"]: [0.0] * len(TYPES) for r in records}
    for i, r in enumerate(scored):
        out[r["id"]] = [float(per_row[t][i]) for t in TYPES]
    return out
