"""Score: ROUGE-1/2/L/Lsum of one technique's predictions (means over rows with bootstrap intervals), its
paired ROUGE-L difference to the baseline with a non-inferiority test, and its lossless check against its
reference technique (strings and token ids). Reads data/generations/*.jsonl and the technique's perf.json,
writes metrics/techniques/<technique>/score.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import GENERATIONS, TECHNIQUE_METRICS, InputError, fail, load_params, log, read_json, read_jsonl, setup_logging, write_json
from stats import bootstrap_means, interval, paired_test, quality_state, rows_to_decide
from techniques import resolve

ROUGE_MODULE = str(Path(__file__).resolve().parent / "headline_rouge")
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
# Machine epsilon (spacing of numbers near 1) per dtype: the "resolution" of the near-tie rule
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


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


def fidelity(records: list[dict[str, Any]], reference: list[dict[str, Any]], key: str = "prediction") -> dict[str, Any]:
    """How many outputs (`key`: the headline, or the generated token ids) equal the reference technique's on the
    same rows, and the first that differs."""
    ref = {r["id"]: r[key] for r in reference if r.get(key) is not None}
    pairs = [(r, ref[r["id"]]) for r in records if r.get(key) is not None and r["id"] in ref]
    same = sum(r[key] == p for r, p in pairs)
    first = next(({"id": r["id"], "prediction": r[key], "reference_prediction": p} for r, p in pairs if r[key] != p), None)
    return {"fidelity": same / len(pairs) if pairs else None, "identical": same, "compared": len(pairs), "first_difference": first}


def token_check(records: list[dict[str, Any]], reference: list[dict[str, Any]], dtype: str | None, units: float) -> dict[str, Any]:
    """Compare generated token ids with the reference technique's, row by row, and classify each row.

    identical: the same ids. near-tie: the ids first differ at a step where the reference's relative
    top-2 logit margin is at most `units` x the dtype's machine epsilon (the technique's own margin when
    the reference has none): two tokens within rounding of each other, so a different but equally valid
    order of floating-point operations may pick either. real difference: any other differing row.
    Rows without token ids (older records, engines that give none) are compared as strings and left unclassified.

    Args:
        records / reference: generation records with token_ids and margins.
        dtype: the technique's compute dtype (perf.json), for the resolution.
        units: how many epsilons count as a tie (params score.near_tie_units).
    """
    eps = EPS.get(str(dtype))
    ref = {r["id"]: r for r in reference if r.get("prediction") is not None}
    counts = {"identical": 0, "near_tie": 0, "real_difference": 0, "unclassified": 0}
    differing = []
    for r in records:
        q = ref.get(r["id"])
        if r.get("prediction") is None or q is None:
            continue
        a, b = r.get("token_ids"), q.get("token_ids")
        if not a or not b:
            counts["identical" if r["prediction"] == q["prediction"] else "unclassified"] += 1
            continue
        if a == b:
            counts["identical"] += 1
            continue
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        margins = q.get("margins") or r.get("margins") or []
        margin = margins[step] if step < len(margins) else None
        if not margins or eps is None:  # no margins recorded at all (an engine without logits): undecidable, not "real"
            kind = "unclassified"
        else:  # past the reference's last margin the lengths differ: a real difference
            kind = "near_tie" if margin is not None and margin <= units * eps else "real_difference"
        counts[kind] += 1
        differing.append({"id": r["id"], "step": step, "margin": margin, "class": kind})
    rule = (f"near-tie: at the first differing token the reference's relative top-2 logit margin (top1 - top2) / max(1, |top1|) "
            f"is <= {units:g} x machine epsilon of {dtype} ({units * eps:.3g})" if eps is not None
            else f"near-tie not decidable: no resolution known for dtype {dtype!r}")
    return {"basis": "token_ids", "compared": sum(counts.values()), **counts, "rule": rule, "differing": differing}


def score(records: list[dict[str, Any]], baseline: list[dict[str, Any]], reference: list[dict[str, Any]], seed: int, bootstrap_samples: int,
          confidence: float, margin: float = 0.01, near_tie_units: float = 4, dtype: str | None = None) -> dict[str, Any]:
    """All quality numbers of one technique.

    ROUGE values are means over rows with percentile bootstrap intervals. The paired difference to the
    baseline runs over every row either technique has a record for; a row one of them set aside (too long,
    no prediction) or lacks scores 0 for it, so setting rows aside never helps.

    Args:
        records: the technique's generation records.
        baseline: the baseline's records (for the paired ROUGE-L difference).
        reference: the records of the technique it must equal if lossless (baseline or target_only).
        seed: for every bootstrap.
        bootstrap_samples: resamples for every interval and p-value.
        confidence: interval level.
        margin: non-inferiority margin as a share of the baseline's mean ROUGE-L (0.01: at least 99% of it).
        near_tie_units / dtype: the near-tie rule of token_check.
    """
    if not any(r.get("prediction") is not None for r in records):
        raise InputError("no predictions to score")
    mine, base = row_scores(records), row_scores(baseline)
    set_aside = [r["id"] for r in records if r.get("prediction") is None]
    result: dict[str, Any] = {"samples": len(records) - len(set_aside), "rows": len(mine), "rows_not_scored": len(set_aside),
                              "rows_set_aside": set_aside, "seed": seed, "bootstrap_samples": bootstrap_samples}
    x = np.asarray(list(mine.values())).T  # [types, rows]
    dist = bootstrap_means(x, bootstrap_samples, seed)  # [resamples, types]
    for k, t in enumerate(TYPES):
        result[t] = float(x[k].mean())
        result[f"{t}_low"], result[f"{t}_high"] = interval(dist[:, k], confidence)
    ids = list(mine) + [i for i in base if i not in mine]  # a row either lacks scores 0 for it
    base_aside = {r["id"] for r in baseline if r.get("prediction") is None} | {i for i in ids if i not in base}
    zero = [0.0] * len(TYPES)
    a, b = [mine.get(i, zero)[2] for i in ids], [base.get(i, zero)[2] for i in ids]
    base_mean = float(np.mean(b)) if b else float("nan")
    t = paired_test(a, b, margin * base_mean, bootstrap_samples, confidence, seed)
    result.update(rougeL_delta=t["delta"], rougeL_delta_low=t["low"], rougeL_delta_high=t["high"], rougeL_delta_p=t["p_value"],
                  rougeL_delta_p_noninferior=t["p_noninferior"], rougeL_delta_sd=t["sd"], rougeL_delta_rows=t["rows"],
                  rougeL_delta_rows_missing=[i for i in ids if i not in mine], rougeL_delta_baseline_set_aside=[i for i in ids if i in base_aside],
                  rougeL_baseline=base_mean, margin_share=margin, noninferiority_margin=margin * base_mean,
                  rougeL_significant=bool(t["low"] > 0 or t["high"] < 0))
    result["quality_state"] = quality_state(t["p_value"], t["p_noninferior"], t["delta"], confidence)
    result["rows_to_decide"] = rows_to_decide(t["delta"], t["sd"], margin * base_mean, confidence) if result["quality_state"] == "inconclusive" else None
    result["baseline_identical"] = fidelity(records, baseline)["fidelity"]
    return result | fidelity(records, reference) | {"token_check": token_check(records, reference, dtype, near_tie_units)}


def main() -> None:
    setup_logging()
    name = sys.argv[1] if len(sys.argv) == 2 else fail("usage: python stages/score.py <technique>")
    params = load_params(required=["base", "score", "techniques"])
    out = TECHNIQUE_METRICS / name / "score.json"
    try:
        cfg = resolve(params, name)
        perf = read_json(TECHNIQUE_METRICS / name / "perf.json")
        for outcome in ("skipped", "failed"):
            if outcome in perf:
                write_json(out, {"technique": name, outcome: perf[outcome]})
                log.info("score: %s %s (%s) -> %s", name, outcome, perf[outcome], out)
                return
        records = read_jsonl(GENERATIONS / f"{name}.jsonl")
        ref_name = cfg["reference"] or "baseline"  # lossy techniques: fidelity to the baseline, for information
        ref_path = GENERATIONS / f"{ref_name}.jsonl"
        reference = read_jsonl(ref_path) if ref_path.exists() else []
        if perf.get("quality"):  # random weights: ROUGE of noise says nothing; token-level fidelity still does
            scored = [r for r in records if r.get("token_ids")]
            check = token_check(scored, reference, perf.get("dtype"), params["score"]["near_tie_units"])
            write_json(out, {"technique": name, "quality": perf["quality"], "samples": len(scored), "fidelity_reference": ref_name,
                             "lossless": cfg["reference"] is not None, **fidelity(scored, reference, "token_ids"), "token_check": check})
            log.info("score: %s quality %s; token fidelity vs %s -> %s", name, perf["quality"], ref_name, out)
            return
        baseline = read_jsonl(GENERATIONS / "baseline.jsonl")
        s = params["score"]
        result = score(records, baseline, reference, s["seed"], s["bootstrap_samples"], s["confidence"], s["margin"], s["near_tie_units"],
                       perf.get("dtype"))
    except (InputError, FileNotFoundError) as e:
        fail(f"score {name}: {e}")
    write_json(out, {"technique": name, "fidelity_reference": ref_name, "lossless": cfg["reference"] is not None,
                     "confidence": s["confidence"], **result})
    log.info("score: %s ROUGE-L %.4f, fidelity %s vs %s -> %s", name, result["rougeL"], result["fidelity"], ref_name, out)


if __name__ == "__main__":
    main()
