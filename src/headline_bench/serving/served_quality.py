"""Served quality, decided as offline quality is: every quality row served once, paired row by row with the offline
reference technique's quality pass, and given one of the offline states.

- equivalent: every row identical to the offline reference or a near-tie by the lossless check (quality/fidelity.py:
  token ids where the server's logprobs name them, the reference's own top-2 margins at the first difference);
- else non-inferior / worse / inconclusive / too few rows: the paired interval of per-row ROUGE-L (served - offline)
  at the level of a family of its own, the serving entries of params (k = len(serving), Bonferroni), decided by
  analysis/verdicts.compare with params `score`'s margin and confidence (serving/summary.decide, in the report).
A row that was not served (an error, a time-out) or whose prompt reached the server otherwise than offline scores 0
and is never identical, so neither can help an entry. Without logprobs a differing row cannot be classified as a
near-tie, so equivalence then needs every headline identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headline_bench.files import TECHNIQUE_METRICS, read_json
from headline_bench.quality.fidelity import equivalence, fidelity, near_tie_threshold, token_check
from headline_bench.quality.rouge import row_scores
from headline_bench.quality.score import paired_rows, quality_owner, quality_records

if TYPE_CHECKING:
    from headline_bench.settings import Params, ServingEntry


def usable(served: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The served records as the comparison sees them: a row whose prompt reached the server otherwise than offline
    loses its prediction (scores 0, never identical)."""
    return [r | {"prediction": None, "token_ids": None} if r.get("prompt_mismatch") else r for r in served]


def aligned(served: list[dict[str, Any]], offline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A served headline equal to the offline one takes the offline token ids: the served ids may end before the stop
    token that the offline ids hold, and the rows are the same answer."""
    ref = {r["id"]: r for r in offline}
    return [r | {"token_ids": ref[r["id"]].get("token_ids")} if r["id"] in ref and r.get("prediction") == ref[r["id"]].get("prediction")
            else r for r in served]


def lossless_check(served: list[dict[str, Any]], offline: list[dict[str, Any]], threshold: float | None, rule: str) -> dict[str, Any]:
    """quality/fidelity.token_check of the served rows against the offline ones, with every offline row that has no
    served headline counted as unclassified (a missing answer is never equivalent). No perturbation cap: the server's
    logprob gaps are not the offline relative margin, so the near-tie rests on the reference's margin alone."""
    check = token_check(aligned(served, offline), offline, threshold, rule)
    answered = {r["id"] for r in served if r.get("prediction") is not None}
    missing = [r["id"] for r in offline if r.get("prediction") is not None and r["id"] not in answered]
    check["unclassified"] += len(missing)
    check["compared"] += len(missing)
    check["not_served"] = missing
    return check


def served_quality(served: list[dict[str, Any]], offline: list[dict[str, Any]], reference: str, threshold: float | None, rule: str,
                   dtype: str | None) -> dict[str, Any]:
    """One entry's served rows paired with its offline reference on the same rows: the lossless check and, per row,
    ROUGE-L served - offline. The state is decided from these by decide() in the serving report, where the family's
    size (the serving entries of params) is known, as the score stage decides offline states from params.

    Args:
        served: one record per quality row served (id, reference, prediction, token_ids or None, prompt_mismatch).
        offline: the offline reference technique's quality-pass records.
        reference: the technique those records are from (named in the state).
        threshold / rule: quality/fidelity.near_tie_threshold() for the entry's dtype and device.
        dtype: the entry's compute dtype, named in an equivalence.
    """
    served = usable(served)
    mine, ref = row_scores(served), row_scores(offline)
    ids, a, b = paired_rows(mine, ref)
    check = lossless_check(served, offline, threshold, rule)
    by_ids = fidelity(served, offline, "token_ids")
    return {"reference": reference, "rows": len(ids), "served": sum(r.get("prediction") is not None for r in served),
            "rougeL": float(np.mean(a)) if a else None, "rougeL_reference": float(np.mean(b)) if b else None,
            "rougeL_deltas": [x - y for x, y in zip(a, b)], "headlines": fidelity(served, offline),
            "token_ids": by_ids if by_ids["compared"] else None, "logprobs": any(r.get("logprob_gaps") for r in served),
            "prompt_mismatch_rows": [r["id"] for r in served if r.get("prompt_mismatch")], "token_check": check,
            "equivalence": equivalence(check, dtype, reference)}


def offline_quality(params: Params, entry: ServingEntry) -> tuple[str | None, list[dict[str, Any]]]:
    """The offline records served quality is paired with: the quality pass that stands for the entry's reference
    technique (its own, or, for a lossless one, its chain of references' end: quality/score.quality_owner)."""
    if not entry.reference or entry.reference not in params.techniques:
        return None, []
    owner = quality_owner(params, entry.reference)
    return owner, quality_records(owner)


def near_tie(params: Params, entry: ServingEntry, device: str | None) -> tuple[float | None, str, str | None]:
    """(threshold, rule, dtype) of the lossless check: the near-tie threshold of the reference technique's dtype and
    device as its perf.json records them (the offline check's own), else the entry's; score's calibration, else epsilons."""
    s = params.score
    perf_path = TECHNIQUE_METRICS / str(entry.reference) / "perf.json"
    perf = read_json(perf_path) if perf_path.is_file() else {}
    dtype, device = perf.get("dtype") or entry.dtype or params.base.dtype, perf.get("device") or device
    path = Path(s.near_tie_calibration or "")
    return (*near_tie_threshold(dtype, device, read_json(path) if path.is_file() else {}, s.near_tie_units), dtype)


def served_states(q_records: list[dict[str, Any]], params: Params, entry: ServingEntry, device: str | None,
                  row_ids: list[Any] | None = None) -> dict[str, Any]:
    """The served rows paired with the offline reference, per quality pass (concurrency 1, and under `at_rate` the
    sustainable rate where it ran); the report decides the states (summary.decide). row_ids: the quality rows the pass
    sent (serve.quality.rows), so that the offline rows beyond them are not counted as unserved."""
    owner, offline = offline_quality(params, entry)
    if row_ids is not None:
        wanted = set(row_ids)
        offline = [r for r in offline if r["id"] in wanted]
    if not offline:
        return {"quality_state": None, "note": f"no offline quality pass to pair with (reference {entry.reference or 'unset'})"}
    threshold, rule, dtype = near_tie(params, entry, device)
    by_level: dict[str, list[dict[str, Any]]] = {}
    for r in q_records:
        by_level.setdefault(r["level"], []).append(r)
    states = {label: served_quality(recs, offline, owner, threshold, rule, dtype) for label, recs in by_level.items()}
    first = states.get("quality concurrency 1") or {"quality_state": None, "note": "the served quality pass did not run"}
    return first | {"at_rate": next((st for label, st in states.items() if label.startswith("quality rate")), None)}
