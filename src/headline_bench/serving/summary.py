"""Serving results per entry and the online-serving pick."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headline_bench.settings import Serve


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
            "offline_reference": cfg.get("reference"), "first_difference": q.get("first_difference"),
            "prompt_check": result.get("prompt_check"), "requests_needed": result.get("requests_needed"),
            "requests_per_level": (result.get("load") or {}).get("requests"), "startup_s": (result.get("server") or {}).get("startup_s")}
    return row


def eligibility(row: dict[str, Any], min_identical_share: float) -> str | None:
    """Why an entry may not be the online-serving pick, or None: its served headlines must equal its offline reference
    (same engine, same greedy decoding) on at least `min_identical_share` of the rows, so that an engine that answers
    fast with the wrong text (garbage, newlines, another server's output) is never chosen."""
    if not row.get("rows_compared"):
        return "no offline reference to compare its served headlines with"
    share = row["rows_identical"] / row["rows_compared"]
    if share < min_identical_share:
        return f"served headlines equal its offline reference on {row['rows_identical']}/{row['rows_compared']} rows < {min_identical_share:.0%}"
    return None


def recommend_online(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Online serving pick: the highest sustainable rate under the SLO (the lower of the independent runs); ties go
    to the lower P50 TTFT at the lowest rate.

    Entries that were skipped or failed, that are not eligible (row["ineligible"]), or that showed the SLO at no
    rate tried, are never picked.
    """
    ok = [r for r in rows if r.get("status") == "ran" and not r.get("ineligible") and (r.get("sustainable_rate") or {}).get("rate") is not None]
    rule = ("among entries whose served headlines equal their offline reference on enough rows, the highest rate at which every run showed the SLO "
            "share (the lower end of its interval) of requests returning a headline within both latency targets; ties: lower P50 TTFT at the lowest rate")
    if not ok:
        return {"choice": None, "rule": rule, "note": "no entry met the SLO at any rate tried; lower serve.rates or relax serve.slo"}
    ranked = sorted(ok, key=lambda r: (-r["sustainable_rate"]["rate"], r.get("ttft_s_p50_low") or float("inf")))
    best = ranked[0]
    note = "its limit lies above the rates tried; add higher serve.rates" if best["sustainable_rate"]["bound"] == "at least" else ""
    return {"choice": best["entry"], "rate": best["sustainable_rate"]["rate"], "bound": best["sustainable_rate"]["bound"], "rule": rule,
            "runner_up": ranked[1]["entry"] if len(ranked) > 1 else None, "note": note}


def summarize(names: list[str], results: dict[str, dict[str, Any]], serve: Serve) -> dict[str, Any]:
    """Every entry's row (with its eligibility under serve.min_identical_share) and the online-serving pick."""
    rows = [entry_row(n, results[n]) for n in names]
    for r in rows:
        if r.get("status") == "ran":
            r["ineligible"] = eligibility(r, serve.min_identical_share)
    return {"slo": serve.slo.model_dump(), "min_identical_share": serve.min_identical_share, "entries": rows, "recommendation": recommend_online(rows)}
