"""All quality numbers of one technique (the score stage's work)."""

from __future__ import annotations

from typing import Any

import numpy as np

from headline_bench.analysis.stats import bootstrap_means, interval, paired_test
from headline_bench.analysis.verdicts import quality_state, rows_to_decide
from headline_bench.errors import InputError
from headline_bench.files import GENERATIONS, QUALITY, TECHNIQUE_METRICS, read_json, read_jsonl
from headline_bench.quality.fidelity import fidelity, token_check
from headline_bench.quality.rouge import TYPES, row_scores
from headline_bench.techniques.config import resolve


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


def quality_records(name: str) -> list[dict[str, Any]]:
    """The technique's quality-pass records; empty when its quality pass did not run (lossless, skipped, failed, no stage)."""
    path = QUALITY / f"{name}.jsonl"
    records = read_jsonl(path) if path.exists() else []
    return records if any(r.get("prediction") is not None for r in records) else []


def quality_owner(params: dict[str, Any], name: str) -> str:
    """The technique whose quality pass stands for `name`: itself, or the end of its chain of `reference`s."""
    seen = [name]
    while (ref := resolve(params, seen[-1])["reference"]) and ref not in seen:
        seen.append(ref)
    return seen[-1]


def scored_set(name: str, params: dict[str, Any], timed: list[dict[str, Any]], check: dict[str, Any]) -> tuple[list, list, dict[str, Any]]:
    """Which records are scored for quality, against which baseline records, and why (recorded in score.json).

    A lossy technique is scored on its own quality pass (data/quality/<technique>.jsonl) against baseline's. A
    lossless one takes its reference's quality pass once every timed row's token ids equal the reference's (the
    lossless check on the timed rows, `check`); one whose ids differ, or a technique without a quality pass, is
    scored on its timed rows against baseline's timed rows, and score.json says so.
    """
    owner = quality_owner(params, name)
    lossless = owner != name
    matches = check["compared"] > 0 and check["identical"] == check["compared"] == sum(r.get("prediction") is not None for r in timed)
    records, baseline = quality_records(owner), quality_records("baseline")
    if records and baseline and (not lossless or matches):
        facts = {"quality_set": str(QUALITY / f"{owner}.jsonl"), "quality_source": "reference" if lossless else "quality pass"}
        return records, baseline, facts | ({"quality_taken_from": owner} if lossless else {})
    why = (f"token ids differ from {resolve(params, name)['reference']} on {check['compared'] - check['identical']} of {check['compared']} timed rows, "
           "so the reference's quality is not taken" if lossless and not matches
           else f"no quality-pass records for {owner if not records else 'baseline'}")
    base_path = GENERATIONS / "baseline.jsonl"
    return timed, read_jsonl(base_path) if base_path.exists() else [], {
        "quality_set": str(GENERATIONS / f"{name}.jsonl"), "quality_source": "timed rows", "quality_note": f"scored on the timed rows: {why}"}


def batch_consistency(name: str, timed: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | None:
    """How many of the technique's quality-pass outputs (batched) equal its timed outputs (batch 1 mostly) on the timed rows,
    by token ids: the share of rows where batching (padding, other kernels) leaves the output as it is. None without a quality pass."""
    path = TECHNIQUE_METRICS / name / "quality.json"
    records = quality_records(name)
    if not records or not path.exists():
        return None
    facts = read_json(path)
    same = fidelity(timed, records, "token_ids")
    return {"quality_batch_size": facts.get("batch_size"), "timed_batch_size": resolve(params, name)["batch_size"], "share": same["fidelity"],
            "identical": same["identical"], "compared": same["compared"], "first_difference": same["first_difference"]}


def score_technique(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """score.json of one technique: its outcome when it was skipped or failed; token-level fidelity only for random
    weights (ROUGE of noise says nothing); else ROUGE over its quality set (scored_set) against baseline, with the
    lossless check (fidelity, token_check) against its reference on the timed rows."""
    cfg = resolve(params, name)
    perf = read_json(TECHNIQUE_METRICS / name / "perf.json")
    for outcome in ("skipped", "failed"):
        if outcome in perf:
            return {"technique": name, outcome: perf[outcome]}
    records = read_jsonl(GENERATIONS / f"{name}.jsonl")
    ref_name = cfg["reference"] or "baseline"  # lossy techniques: fidelity to the baseline, for information
    ref_path = GENERATIONS / f"{ref_name}.jsonl"
    reference = read_jsonl(ref_path) if ref_path.exists() else []
    s = params["score"]
    if perf.get("quality"):
        scored = [r for r in records if r.get("token_ids")]
        check = token_check(scored, reference, perf.get("dtype"), s["near_tie_units"])
        return {"technique": name, "quality": perf["quality"], "samples": len(scored), "fidelity_reference": ref_name,
                "lossless": cfg["reference"] is not None, **fidelity(scored, reference, "token_ids"), "token_check": check}
    check = token_check(records, reference, perf.get("dtype"), s["near_tie_units"])
    scored, baseline, source = scored_set(name, params, records, check)
    result = score(scored, baseline, [], s["seed"], s["bootstrap_samples"], s["confidence"], s["margin"], s["near_tie_units"], perf.get("dtype"))
    timed = fidelity(records, reference) | {"token_check": check, "timed_rows": len(records)}  # the lossless check: timed rows, batch 1
    return {"technique": name, "fidelity_reference": ref_name, "lossless": cfg["reference"] is not None, "confidence": s["confidence"],
            **source, **result, **timed, "batched_vs_timed": batch_consistency(name, records, params)}
