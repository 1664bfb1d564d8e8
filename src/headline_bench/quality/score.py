"""All quality numbers of one technique (the score stage's work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from headline_bench.analysis.stats import bootstrap_means, interval, paired_test
from headline_bench.analysis.verdicts import quality_state, rows_to_decide
from headline_bench.errors import InputError
from headline_bench.files import GENERATIONS, TECHNIQUE_METRICS, read_json, read_jsonl
from headline_bench.measure.records import assemble, join
from headline_bench.quality.fidelity import fidelity, token_check
from headline_bench.quality.records import Score
from headline_bench.quality.rouge import TYPES, row_scores

if TYPE_CHECKING:
    from headline_bench.settings import Score


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
    return join(result, fidelity(records, reference), {"token_check": token_check(records, reference, dtype, near_tie_units)})


def score_technique(name: str, lossless_reference: str | None, s: Score) -> dict[str, Any]:
    """score.json of one technique: its outcome when it was skipped or failed; token-level fidelity only for random
    weights (ROUGE of noise says nothing); else score() against baseline and its reference.

    Args:
        name: the technique.
        lossless_reference: the technique whose predictions it must reproduce (params `reference`), or None.
        s: params `score`.
    """
    perf = read_json(TECHNIQUE_METRICS / name / "perf.json")
    for outcome in ("skipped", "failed"):
        if outcome in perf:
            return assemble(Score, {"technique": name, outcome: perf[outcome]})
    records = read_jsonl(GENERATIONS / f"{name}.jsonl")
    ref_name = lossless_reference or "baseline"  # lossy techniques: fidelity to the baseline, for information
    ref_path = GENERATIONS / f"{ref_name}.jsonl"
    reference = read_jsonl(ref_path) if ref_path.exists() else []
    if perf.get("quality"):
        scored = [r for r in records if r.get("token_ids")]
        check = token_check(scored, reference, perf.get("dtype"), s.near_tie_units)
        return assemble(Score, {"technique": name, "quality": perf["quality"], "samples": len(scored), "fidelity_reference": ref_name,
                                "lossless": lossless_reference is not None}, fidelity(scored, reference, "token_ids"), {"token_check": check})
    baseline = read_jsonl(GENERATIONS / "baseline.jsonl")
    result = score(records, baseline, reference, s.seed, s.bootstrap_samples, s.confidence, s.margin, s.near_tie_units, perf.get("dtype"))
    return assemble(Score, {"technique": name, "fidelity_reference": ref_name, "lossless": lossless_reference is not None, "confidence": s.confidence},
                    result)
