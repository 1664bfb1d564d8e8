"""All quality numbers of one technique (the score stage's work)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headline_bench.analysis.stats import bootstrap_means, interval
from headline_bench.analysis.verdicts import compare, family_of, mlperf_99
from headline_bench.errors import InputError
from headline_bench.files import GENERATIONS, LOSSLESS, QUALITY, TECHNIQUE_METRICS, read_json, read_jsonl
from headline_bench.measure.records import assemble
from headline_bench.quality.fidelity import (
    calibration_key,
    equivalence,
    fidelity,
    near_tie_threshold,
    perturbation_cap,
    row_cap,
    token_check,
)
from headline_bench.quality.records import Score, outcome_score
from headline_bench.quality.rouge import TYPES, row_scores
from headline_bench.techniques.config import resolve

if TYPE_CHECKING:
    from headline_bench.settings import Params
    from headline_bench.settings import Score as ScoreSettings


def paired_rows(mine: dict[str, list[float]], other: dict[str, list[float]]) -> tuple[list[str], list[float], list[float]]:
    """Row ids either side has a record for, with both sides' ROUGE-L on them; a row one side lacks scores 0 for it,
    so setting rows aside never helps."""
    ids = list(mine) + [i for i in other if i not in mine]
    zero = [0.0] * len(TYPES)
    return ids, [mine.get(i, zero)[2] for i in ids], [other.get(i, zero)[2] for i in ids]


def score(records: list[dict[str, Any]], baseline: list[dict[str, Any]], reference: list[dict[str, Any]], score_params: ScoreSettings,
          family: tuple[str, int] | None, check: dict[str, Any], lossless_reference: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """All quality numbers of one technique.

    ROUGE values are means over rows with percentile bootstrap intervals. The quality state (analysis/verdicts.py)
    comes from the paired difference of per-row ROUGE-L to baseline, or, for a lossless technique whose token check
    found real differences, to its reference; a lossless technique whose rows are all identical or near-ties is
    "equivalent" to its reference and tested against nothing.

    Args:
        records: the technique's generation records.
        baseline: the baseline's records.
        reference: the records of the technique it must equal if lossless (its reference; baseline for lossy ones).
        score_params: params `score` (seed, bootstrap_samples, confidence, margin, min_rows, power).
        family: (family, k) from family_of(); None for baseline, which is the reference itself.
        check: token_check() of the records against `reference`.
        lossless_reference: the technique's `reference` when it is lossless.
        dtype: the technique's compute dtype, named in the equivalence.
    """
    if not any(r.get("prediction") is not None for r in records):
        raise InputError("no predictions to score")
    s = score_params
    mine, base = row_scores(records), row_scores(baseline)
    set_aside = [r["id"] for r in records if r.get("prediction") is None]
    result: dict[str, Any] = {"samples": len(records) - len(set_aside), "rows": len(mine), "rows_not_scored": len(set_aside),
                              "rows_set_aside": set_aside, "seed": s.seed, "bootstrap_samples": s.bootstrap_samples}
    x = np.asarray(list(mine.values())).T  # [types, rows]
    dist = bootstrap_means(x, s.bootstrap_samples, s.seed)  # [resamples, types]
    for k, t in enumerate(TYPES):
        result[t] = float(x[k].mean())
        result[f"{t}_low"], result[f"{t}_high"] = interval(dist[:, k], s.confidence)
    ids, a, b = paired_rows(mine, base)
    base_aside = {r["id"] for r in baseline if r.get("prediction") is None} | {i for i in ids if i not in base}
    result.update(rougeL_baseline=float(np.mean(b)) if b else None, rougeL_delta_rows_missing=[i for i in ids if i not in mine],
                  rougeL_delta_baseline_set_aside=[i for i in ids if i in base_aside], baseline_identical=fidelity(records, baseline)["fidelity"],
                  mlperf_99=mlperf_99(result["rougeL"], float(np.mean(b)) if b else None), margin=s.margin)
    equivalent = equivalence(check, dtype, lossless_reference) if lossless_reference else None
    if family is None:
        result |= {"quality_state": "reference", "quality_basis": "the reference"}
    elif equivalent:
        result |= {"quality_state": "equivalent", "quality_basis": equivalent, "quality_reference": lossless_reference,
                   "rougeL_delta": float(np.mean(a) - np.mean(b)), "rougeL_delta_vs": "baseline"}
    else:
        vs = lossless_reference if lossless_reference and reference else "baseline"  # a reference with no records: vs baseline
        result["quality_basis"] = f"paired differences, {family[0]} family of {family[1]} (Bonferroni)"
        if lossless_reference:
            if reference:
                _, a, b = paired_rows(mine, row_scores(reference))
            real = [d["id"] for d in check["differing"] if d["class"] != "near_tie"]
            found = (f"{len(real)} row(s) differ beyond a near-tie ({', '.join(real)})" if check.get("compared")
                     else "no rows to compare (the reference has no records)")
            result["quality_basis"] = f"lossless check vs {lossless_reference}: {found}; tested against {vs} at the lossy family's level"
        result |= compare([p - q for p, q in zip(a, b)], family[0], family[1], s) | {"rougeL_delta_vs": vs, "quality_reference": vs}
    return result | fidelity(records, reference) | {"token_check": check}


def read_dep(path: Path) -> list[dict[str, Any]]:
    """A file the score reads (a dvc.yaml dep): missing is an error, never an empty set of rows (its stage has not run)."""
    if not path.exists():
        raise InputError(f"{path}: missing (the stage that writes it has not run; `dvc repro` runs it first)")
    return read_jsonl(path)


def quality_records(name: str) -> list[dict[str, Any]]:
    """The technique's quality-pass records; empty when its quality pass did not run (lossless, skipped, failed)."""
    records = read_dep(QUALITY / f"{name}.jsonl")
    return records if any(r.get("prediction") is not None for r in records) else []


def quality_owner(params: Params, name: str) -> str:
    """The technique whose quality pass stands for `name`: itself, or the end of its chain of `reference`s."""
    seen = [name]
    while (ref := params.entry(seen[-1]).reference) and ref not in seen:
        seen.append(ref)
    return seen[-1]


def check_records(name: str) -> list[dict[str, Any]]:
    """The lossless check pass's records of a technique (data/lossless/<technique>.jsonl); empty where it ran none."""
    path = LOSSLESS / f"{name}.jsonl"
    return read_jsonl(path) if path.exists() else []


def scored_set(name: str, params: Params, timed: list[dict[str, Any]], check: dict[str, Any], extra: int = 0) -> tuple[list, list, dict[str, Any]]:
    """Which records are scored for quality, against which baseline records, and why (recorded in score.json).

    A lossy technique is scored on its own quality pass (data/quality/<technique>.jsonl) against baseline's. A
    lossless one takes its reference's quality pass once every timed row's token ids equal the reference's or differ
    only at a near-tie (the lossless check on the timed rows and the check pass's `extra` rows, `check`: equivalent up
    to the dtype's numerics); one with
    a real or unclassifiable difference, or a technique without a quality pass, is scored on its timed rows against
    baseline's timed rows, and score.json says why (`quality_source_note`).
    """
    owner = quality_owner(params, name)
    lossless = owner != name
    predicted = sum(r.get("prediction") is not None for r in timed) + extra  # extra: check-pass rows with a prediction
    matches = 0 < check["compared"] == predicted and check["identical"] + check["near_tie"] == predicted
    records, baseline = quality_records(owner), quality_records("baseline")
    if records and baseline and (not lossless or matches):
        facts = {"quality_set": str(QUALITY / f"{owner}.jsonl"), "quality_source": "reference" if lossless else "quality pass"}
        return records, baseline, facts | ({"quality_taken_from": owner} if lossless else {})
    why = (f"token ids differ from {params.entry(name).reference} beyond a near-tie on {check['real_difference'] + check['unclassified']} "
           f"of {check['compared']} checked rows, so the reference's quality is not taken" if lossless and not matches
           else f"no quality-pass records for {owner if not records else 'baseline'}")
    return timed, read_dep(GENERATIONS / "baseline.jsonl"), {
        "quality_set": str(GENERATIONS / f"{name}.jsonl"), "quality_source": "timed rows", "quality_source_note": f"scored on the timed rows: {why}"}


def batch_consistency(name: str, timed: list[dict[str, Any]], params: Params) -> dict[str, Any] | None:
    """How many of the technique's quality-pass outputs (batched) equal its timed outputs (batch 1 mostly) on the timed rows,
    by token ids: the share of rows where batching (padding, other kernels) leaves the output as it is. None without a quality pass."""
    path = TECHNIQUE_METRICS / name / "quality.json"
    records = quality_records(name) if path.exists() else []
    if not records:
        return None
    facts = read_json(path)
    same = fidelity(timed, records, "token_ids")
    return {"quality_batch_size": facts.get("batch_size"), "timed_batch_size": resolve(params, name).batch_size, "share": same["fidelity"],
            "identical": same["identical"], "compared": same["compared"], "first_difference": same["first_difference"]}


def score_technique(name: str, params: Params) -> dict[str, Any]:
    """score.json of one technique: its outcome when it was skipped or failed; token-level fidelity only for random
    weights (ROUGE of noise says nothing); else score() against baseline and its reference, with the quality state
    decided here at the level of the technique's family (fixed by params, so every file states the same verdict)."""
    lossless_reference = params.entry(name).reference
    perf = read_json(TECHNIQUE_METRICS / name / "perf.json")
    if outcome := outcome_score(name, perf):
        return outcome
    records = read_jsonl(GENERATIONS / f"{name}.jsonl")
    ref_name = lossless_reference or "baseline"  # lossy techniques: fidelity to the baseline, for information
    ref_path = GENERATIONS / f"{ref_name}.jsonl"
    reference = read_jsonl(ref_path) if ref_path.exists() else []
    s = params.score
    cal_path = Path(s.near_tie_calibration or "")
    calibration = read_json(cal_path) if cal_path.is_file() else {}
    key = calibration_key((perf.get("config") or {}).get("model_name"), perf.get("env"), perf.get("device"), perf.get("dtype"))
    threshold, rule = near_tie_threshold(perf.get("dtype"), key, calibration, s.near_tie_units)
    cap = perturbation_cap(threshold, row_cap(key, calibration))
    head = {"technique": name, "fidelity_reference": ref_name, "lossless": lossless_reference is not None}
    if perf.get("quality"):
        scored = [r for r in records if r.get("token_ids")]
        return assemble(Score, head, {"quality": perf["quality"], "samples": len(scored)}, fidelity(scored, reference, "token_ids"),
                        {"token_check": token_check(scored, reference, threshold, rule, cap)})
    reference = read_dep(ref_path)  # beyond random weights, a missing reference is an error, not "no rows to compare"
    # the lossless check: timed rows plus the check pass's further rows, each side run as timed
    further = check_records(name) if lossless_reference else []
    check = token_check(records + further, reference + check_records(ref_name), threshold, rule, cap)
    scored, baseline, source = scored_set(name, params, records, check, sum(r.get("prediction") is not None for r in further))
    family = None if name == "baseline" else family_of(name, params.techniques, s)
    # the reference's records over the same rows as `scored`: its quality pass, or its timed rows when those are scored
    on_quality_pass = source["quality_source"] != "timed rows"
    paired = ((on_quality_pass and quality_records(lossless_reference)) or reference) if lossless_reference else []
    result = score(scored, baseline, paired, s, family, check, lossless_reference, perf.get("dtype"))
    for key in ("fidelity", "identical", "compared", "first_difference", "token_check"):  # stated once, on the timed rows
        result.pop(key, None)
    timed = fidelity(records, reference) | {"token_check": check, "timed_rows": len(records), "check_rows": len(further)}
    return assemble(Score, head, {"confidence": s.confidence}, source, result, timed, {"batched_vs_timed": batch_consistency(name, records, params)})
