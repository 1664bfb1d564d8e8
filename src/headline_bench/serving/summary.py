"""Serving results per entry and the online-serving pick."""

from __future__ import annotations

from typing import Any


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
            "offline_reference": cfg.get("reference"), "first_difference": q.get("first_difference"),
            "prompt_tokens_match": result.get("prompt_tokens_match"), "startup_s": (result.get("server") or {}).get("startup_s")}
    return row


def recommend_online(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Online serving pick: the highest sustainable rate under the SLO; ties go to the lower P50 TTFT at the lowest rate.

    Entries that were skipped or failed, or that met the SLO at no rate tried, are never picked.
    """
    ok = [r for r in rows if r.get("status") == "ran" and (r.get("sustainable_rate") or {}).get("rate") is not None]
    rule = "highest rate at which at least the SLO share of requests met both latency targets; ties: lower P50 TTFT at the lowest rate"
    if not ok:
        return {"choice": None, "rule": rule, "note": "no entry met the SLO at any rate tried; lower serve.rates or relax serve.slo"}
    ranked = sorted(ok, key=lambda r: (-r["sustainable_rate"]["rate"], r.get("ttft_s_p50_low") or float("inf")))
    best = ranked[0]
    note = "its limit lies above the rates tried; add higher serve.rates" if best["sustainable_rate"]["bound"] == "at least" else ""
    return {"choice": best["entry"], "rate": best["sustainable_rate"]["rate"], "bound": best["sustainable_rate"]["bound"], "rule": rule,
            "runner_up": ranked[1]["entry"] if len(ranked) > 1 else None, "note": note}


def summarize(names: list[str], results: dict[str, dict[str, Any]], slo: dict[str, Any]) -> dict[str, Any]:
    rows = [entry_row(n, results[n]) for n in names]
    return {"slo": slo, "entries": rows, "recommendation": recommend_online(rows)}
