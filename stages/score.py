"""Score: ROUGE-1/2/L/Lsum (with bootstrap 95% intervals) of one technique's predictions, its fidelity
(share of predictions identical to its reference technique's) and its paired ROUGE-L difference to the
baseline. Reads data/generations/*.jsonl, writes metrics/techniques/<technique>/score.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from common import GENERATIONS, TECHNIQUE_METRICS, InputError, fail, load_params, log, read_json, read_jsonl, setup_logging, write_json
from stats import paired_bootstrap
from techniques import resolve

ROUGE_MODULE = str(Path(__file__).resolve().parent / "headline_rouge")
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def rouge(predictions: list[str], references: list[str], seed: int, per_row: bool = False) -> dict[str, Any]:
    """ROUGE through `evaluate` with the repo's metric module; aggregated with CI, or per row."""
    import evaluate

    metric = evaluate.load(ROUGE_MODULE)
    if per_row:
        return metric.compute(predictions=predictions, references=references, use_aggregator=False)
    return metric.compute(predictions=predictions, references=references, return_ci=True, seed=seed)


def fidelity(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """How many predictions equal the reference technique's on the same rows, and the first that differs."""
    ref = {r["id"]: r["prediction"] for r in reference if r.get("prediction") is not None}
    pairs = [(r, ref[r["id"]]) for r in records if r.get("prediction") is not None and r["id"] in ref]
    same = sum(r["prediction"] == p for r, p in pairs)
    first = next(({"id": r["id"], "prediction": r["prediction"], "reference_prediction": p} for r, p in pairs if r["prediction"] != p), None)
    return {"fidelity": same / len(pairs) if pairs else None, "identical": same, "compared": len(pairs), "first_difference": first}


def score(records: list[dict[str, Any]], baseline: list[dict[str, Any]], reference: list[dict[str, Any]], seed: int, bootstrap_samples: int, confidence: float) -> dict[str, Any]:
    """All quality numbers of one technique.

    Args:
        records: the technique's generation records.
        baseline: the baseline's records (for the paired ROUGE-L difference).
        reference: the records of the technique it must equal if lossless (baseline or target_only).
        seed: for every bootstrap.
        bootstrap_samples: resamples for the paired difference.
        confidence: interval level for the paired difference.
    """
    scored = [r for r in records if r.get("prediction") is not None]
    if not scored:
        raise InputError("no predictions to score")
    preds, refs = [r["prediction"] for r in scored], [r["reference"] for r in scored]
    result: dict[str, Any] = {"samples": len(scored), "rows_not_scored": len(records) - len(scored)}
    result.update({k: float(v) for k, v in rouge(preds, refs, seed).items()})
    base = {r["id"]: r for r in baseline if r.get("prediction") is not None}
    paired = [r for r in scored if r["id"] in base]
    if paired:
        mine = rouge([r["prediction"] for r in paired], [r["reference"] for r in paired], seed, per_row=True)["rougeL"]
        theirs = rouge([base[r["id"]]["prediction"] for r in paired], [r["reference"] for r in paired], seed, per_row=True)["rougeL"]
        delta, lo, hi = paired_bootstrap(mine, theirs, bootstrap_samples, confidence, seed)
        result.update(rougeL_delta=delta, rougeL_delta_low=lo, rougeL_delta_high=hi, rougeL_delta_rows=len(paired),
                      rougeL_significant=bool(lo > 0 or hi < 0))
    result["baseline_identical"] = fidelity(scored, baseline)["fidelity"]
    return result | fidelity(scored, reference)


def main() -> None:
    setup_logging()
    name = sys.argv[1] if len(sys.argv) == 2 else fail("usage: python stages/score.py <technique>")
    params = load_params(required=["base", "score", "techniques"])
    out = TECHNIQUE_METRICS / name / "score.json"
    try:
        cfg = resolve(params, name)
        perf = read_json(TECHNIQUE_METRICS / name / "perf.json")
        if "skipped" in perf:
            write_json(out, {"technique": name, "skipped": perf["skipped"]})
            log.info("score: %s was skipped (%s) -> %s", name, perf["skipped"], out)
            return
        records = read_jsonl(GENERATIONS / f"{name}.jsonl")
        baseline = read_jsonl(GENERATIONS / "baseline.jsonl")
        ref_name = cfg["reference"] or "baseline"  # lossy techniques: fidelity to the baseline, for information
        reference = read_jsonl(GENERATIONS / f"{ref_name}.jsonl")
        s = params["score"]
        result = score(records, baseline, reference, params["base"]["seed"], s["bootstrap_samples"], s["confidence"])
    except (InputError, FileNotFoundError) as e:
        fail(f"score {name}: {e}")
    write_json(out, {"technique": name, "fidelity_reference": ref_name, "lossless": cfg["reference"] is not None,
                     "confidence": s["confidence"], **result})
    log.info("score: %s ROUGE-L %.4f, fidelity %s vs %s -> %s", name, result["rougeL"], result["fidelity"], ref_name, out)


if __name__ == "__main__":
    main()
