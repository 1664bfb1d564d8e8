"""Serving results per entry and the online-serving pick."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headline_bench.analysis.verdicts import compare

if TYPE_CHECKING:
    from headline_bench.settings import Score, Serve

FAMILY = "serving"  # the serving entries of params: a quality family of their own
ELIGIBLE = ("equivalent", "non-inferior")  # served quality states (serving/served_quality.py) that make an entry eligible


def entry_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """One entry's headline numbers for the table and summary.json."""
    cfg = result.get("config") or {}
    knobs = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("engine", "model", "reference") and v is not None)
    row: dict[str, Any] = {"entry": name, "engine": cfg.get("engine"), "knobs": knobs or "defaults", "model": cfg.get("model")}
    if result.get("skipped") or result.get("failed"):
        row |= {"status": "skipped" if result.get("skipped") else "failed", "reason": result.get("skipped") or result.get("failed")}
        if not result.get("levels"):
            return row
    levels = sorted(result.get("levels") or [], key=lambda lv: (lv["kind"] != "rate", lv.get(lv["kind"], 0)))  # rates, then concurrency
    rated = sorted((lv for lv in levels if lv.get("rate") is not None), key=lambda lv: lv["rate"])
    q = result.get("quality") or {}
    first = rated[0] if rated else {}
    row |= {"status": row.get("status", "ran"), "sustainable_rate": result.get("sustainable_rate"), "levels": levels,
            "ttft_s_p50_low": (first.get("ttft_s") or {}).get("p50"), "tpot_s_p50_low": (first.get("tpot_s") or {}).get("p50"),
            "low_rate": first.get("rate"), "max_goodput": max((lv["goodput"] for lv in levels), default=None),
            "max_output_token_throughput": max((lv["output_token_throughput"] for lv in levels), default=None),
            "rougeL": q.get("rougeL"), "identical_to_offline": q.get("identical_to_offline"), "compared_to_offline": q.get("compared_to_offline"),
            "rows_identical": q.get("rows_identical"), "rows_compared": q.get("rows_compared"), "prompt_differs_rows": q.get("prompt_differs_rows") or [],
            "offline_reference": cfg.get("reference"), "first_difference": q.get("first_difference"), "served_quality": result.get("served_quality"),
            "client_check": result.get("client_check"),
            "prompt_check": result.get("prompt_check"), "requests_needed": result.get("requests_needed"),
            "requests_per_level": (result.get("load") or {}).get("requests"), "startup_s": (result.get("server") or {}).get("startup_s")}
    return row


def decide(pairing: dict[str, Any] | None, k: int, score: Score) -> dict[str, Any] | None:
    """The served quality state from serve.json's pairing (serving/served_quality.py): "equivalent" when the lossless
    check found every row identical or a near-tie, else analysis/verdicts.compare of the per-row ROUGE-L differences
    in the serving family of k entries (non-inferior, worse, inconclusive, too few rows)."""
    if not pairing or pairing.get("rougeL_deltas") is None:
        return pairing
    out = {k_: v for k_, v in pairing.items() if k_ != "rougeL_deltas"} | {"at_rate": decide(pairing.get("at_rate"), k, score)}
    deltas = pairing["rougeL_deltas"]
    if pairing.get("equivalence"):
        return out | {"quality_state": "equivalent", "quality_basis": pairing["equivalence"], "rougeL_delta": sum(deltas) / len(deltas) if deltas else None}
    c = pairing["token_check"]
    basis = (f"{c['real_difference'] + c['unclassified']} of {c['compared']} rows differ from {pairing['reference']} beyond a near-tie or cannot be "
             f"classified; paired t, {FAMILY} family of {k} (Bonferroni)")
    return out | compare(deltas, FAMILY, k, score) | {"quality_basis": basis}


def eligibility(row: dict[str, Any]) -> str | None:
    """Why an entry may not be the online-serving pick, or None: its served quality (every quality row served once,
    paired with its offline reference; serving/served_quality.py) must be equivalent or non-inferior, decided by the
    rule offline quality is decided by, so that an engine that answers fast with the wrong text is never chosen and one
    whose batching only changes numerics is not excluded for it."""
    sq = row.get("served_quality") or {}
    state = sq.get("quality_state")
    if state is None:
        return f"no served quality state ({sq.get('note') or 'the served quality pass did not run'})"
    if state not in ELIGIBLE:
        return f"served quality {state} vs {sq.get('reference')}"
    return None


def recommend_online(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Online serving pick: the highest sustainable rate under the SLO (the lower of the independent runs); ties go
    to the lower P50 TTFT at the lowest rate.

    Entries that were skipped or failed, that are not eligible (row["ineligible"]), or that showed the SLO at no
    rate tried, are never picked.
    """
    ok = [r for r in rows if r.get("status") == "ran" and not r.get("ineligible") and (r.get("sustainable_rate") or {}).get("rate") is not None]
    rule = ("among entries whose served quality is equivalent or non-inferior to their offline reference, the highest rate at which every run showed "
            "the SLO share (the lower end of its interval) of requests returning a headline to the offline prompt within both latency targets, at "
            "levels where neither the server died nor the client was the bottleneck; ties: lower P50 TTFT at the lowest rate")
    if not ok:
        ran = [r for r in rows if r.get("status") == "ran"]
        note = ("no entry that ran is eligible (served quality equivalent or non-inferior to its offline reference)" if ran and all(r.get("ineligible") for r in ran)
                else "no eligible entry met the SLO at any rate tried; lower serve.rates or relax serve.slo")
        return {"choice": None, "rule": rule, "note": note}
    ranked = sorted(ok, key=lambda r: (-r["sustainable_rate"]["rate"], r.get("ttft_s_p50_low") or float("inf")))
    best = ranked[0]
    note = "its limit lies above the rates tried; add higher serve.rates" if best["sustainable_rate"]["bound"] == "at least" else ""
    return {"choice": best["entry"], "rate": best["sustainable_rate"]["rate"], "bound": best["sustainable_rate"]["bound"], "rule": rule,
            "eligible_by": (best.get("served_quality") or {}).get("quality_state"),
            "runner_up": ranked[1]["entry"] if len(ranked) > 1 else None, "note": note}


def summarize(names: list[str], results: dict[str, dict[str, Any]], serve: Serve, score: Score) -> dict[str, Any]:
    """Every entry's row (its served quality state decided in the family of `names`, and its eligibility by that
    state) and the online-serving pick."""
    rows = [entry_row(n, results[n]) for n in names]
    for r in rows:
        r["served_quality"] = decide(r.get("served_quality"), len(names), score)
        if r.get("status") == "ran":
            r["ineligible"] = eligibility(r)
    return {"slo": serve.slo.model_dump(), "client": serve.client.model_dump(), "entries": rows, "recommendation": recommend_online(rows)}
