"""Serving maths: latency summaries, goodput under latency targets and the search for the highest sustainable
request rate. Pure functions over plain dicts, so the serve stage and the tests share one definition.

Definitions (stated in the report):
All times are the client's clock (perf_counter), from just before the request is POSTed, so they include the
client's own cost (client_check.py measures that floor).
- TTFT: request sent -> first streamed chunk with text (prefill, queueing and the first decode step included).
- E2E: request sent -> last text chunk read, i.e. the chunk holding the stop (newline) or the stream's last text;
  a stream that ends with no text is timed to its end.
- ITL: every gap between consecutive text chunks; a chunk that carries several tokens is one gap.
- TPOT per request: (E2E - TTFT) / (text chunks - 1), MLPerf's definition; none for one-chunk outputs. Output
  tokens are text chunks (one per decode step on these servers).
- Goodput: requests that finished without error, returned a non-empty cleaned headline, met every SLO
  (TTFT <= ttft_s, TPOT <= tpot_s) and whose prompt reached the server as offline (the same token ids, and the
  server's own prompt-token count, where it reported one, equal to the offline count), per second of the level's
  wall time; goodput share: those requests over all requests sent (errors, time-outs, empty headlines and prompts
  that reached the server otherwise count as misses).
- A level during which the server died, or during which the client was the bottleneck (client_check.py), is
  failed whatever its share.
- The share is a binomial proportion of n requests: it is reported with a Wilson interval whose ends are one-sided
  bounds at slo.confidence, and a level passes only when the lower bound clears slo.share, so a claim never rests
  on fewer requests than can show it (requests_needed)."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

Level = dict[str, Any]


PCTS = (50, 90, 99)


def summarize(values: list[float]) -> dict[str, Any]:
    """n, mean, P50, P90 and P99 (numpy linear interpolation), plus the maximum.

    Below 100 samples a P99 is the top sample or an interpolation of the top two, so `p99` is left out
    there and the report shows `max` instead.
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()), "max": float(v.max())}
    for p, q in zip(PCTS, np.percentile(v, PCTS)):
        if p < 99 or v.size >= 100:
            out[f"p{p}"] = float(q)
    return out


def tpot(e2e_s: float | None, ttft_s: float | None, tokens: int) -> float | None:
    """MLPerf's time per output token: the decode time spread over the tokens after the first."""
    if e2e_s is None or ttft_s is None or tokens < 2:
        return None
    return (e2e_s - ttft_s) / (tokens - 1)


def wilson(successes: int, n: int, confidence: float) -> tuple[float, float] | None:
    """Wilson score interval of a binomial share; each end is a one-sided bound at `confidence`."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(confidence)
    p, z2 = successes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def requests_needed(share: float, confidence: float) -> int | None:
    """The fewest requests whose Wilson lower bound can clear `share` at all (every request good: n / (n + z^2));
    None for a share of 1, which no finite sample shows."""
    if share >= 1:
        return None
    z2 = NormalDist().inv_cdf(confidence) ** 2
    return math.ceil(share * z2 / (1 - share) - 1e-9)


def meets_slo(request: dict[str, Any], slo: dict[str, float]) -> bool:
    """A request counts toward goodput when it finished without error, returned a non-empty headline (garbage
    newlines are not an answer), its prompt reached the server as offline (`prompt_mismatch` false: a fast answer to
    another input is not the benchmark's answer) and it met both latency targets."""
    if request.get("error") or request.get("ttft_s") is None or not request.get("headline") or request.get("prompt_mismatch"):
        return False
    t = request.get("tpot_s")
    return request["ttft_s"] <= slo["ttft_s"] and (t is None or t <= slo["tpot_s"])


def level_summary(requests: list[dict[str, Any]], wall_s: float, slo: dict[str, float]) -> Level:
    """The numbers of one load level.

    Args:
        requests: one dict per request sent (ttft_s, e2e_s, tpot_s, itl_s list, tokens, error, timed_out).
        wall_s: from the level's start to the last request's end.
        slo: {ttft_s, tpot_s, share, confidence}.
    """
    ok = [r for r in requests if not r.get("error")]
    good = [r for r in requests if meets_slo(r, slo)]
    wall = max(wall_s, 1e-9)
    tokens = sum(r.get("tokens") or 0 for r in ok)
    return {
        "sent": len(requests), "ok": len(ok), "errors": sum(bool(r.get("error")) and not r.get("timed_out") for r in requests),
        "timeouts": sum(bool(r.get("timed_out")) for r in requests), "good": len(good), "wall_s": wall_s,
        "request_throughput": len(ok) / wall, "output_token_throughput": tokens / wall,
        "goodput": len(good) / wall, "goodput_share": len(good) / len(requests) if requests else None,
        "goodput_share_interval": wilson(len(good), len(requests), slo["confidence"]), "confidence": slo["confidence"],
        "empty": sum(not r.get("error") and not r.get("headline") for r in requests),
        "prompt_mismatch": sum(bool(r.get("prompt_mismatch")) for r in requests),
        "ttft_s": summarize([r.get("ttft_s") for r in ok]), "tpot_s": summarize([r.get("tpot_s") for r in ok]),
        "itl_s": summarize([g for r in ok for g in r.get("itl_s") or []]), "e2e_s": summarize([r.get("e2e_s") for r in ok]),
        "output_tokens": summarize([r.get("tokens") for r in ok]),
    }


def failed_by(level: Level) -> str | None:
    """Why a level fails whatever its share: the server died during it, or the client was the bottleneck."""
    return "server died" if level.get("server_died") else "client-bound" if level.get("client_bound") else None


def passes(level: Level, share: float) -> bool:
    """The level showed the SLO share: the lower end of its interval clears it (n too small to show it is no pass),
    and neither a dead server nor a saturated client makes it a failed level."""
    interval = level.get("goodput_share_interval")
    return interval is not None and interval[0] >= share and failed_by(level) is None


def verdict(level: Level, share: float) -> str:
    """pass (lower bound clears the share), fail (upper bound below it), undecided (the interval straddles it), or
    "failed: server died" / "failed: client-bound" (failed_by)."""
    if failed_by(level):
        return f"failed: {failed_by(level)}"
    interval = level.get("goodput_share_interval")
    if interval is None:
        return "not measured"
    return "pass" if interval[0] >= share else "fail" if interval[1] < share else "undecided"


def bracket(levels: list[Level], share: float) -> tuple[float | None, float | None]:
    """(highest passing rate below the lowest failing one, lowest failing rate) over the measured rate levels.

    Goodput share is taken to fall as the rate rises, so a pass above the lowest failure is noise and is
    not trusted.
    """
    rated = sorted((lv for lv in levels if lv.get("rate") is not None), key=lambda lv: lv["rate"])
    fail = next((lv["rate"] for lv in rated if not passes(lv, share)), None)
    ok = [lv["rate"] for lv in rated if passes(lv, share) and (fail is None or lv["rate"] < fail)]
    return (ok[-1] if ok else None), fail


def next_rate(levels: list[Level], share: float, min_gap: float) -> float | None:
    """The next rate to measure: the midpoint of the pass/fail bracket while it is wider than `min_gap` (relative).

    With no passing rate it halves the lowest failing one; with no failing rate there is nothing to search
    (the answer is "at least the highest rate measured").
    """
    lo, hi = bracket(levels, share)
    if hi is None:
        return None
    if lo is None:
        return hi / 2
    return (lo + hi) / 2 if (hi - lo) / hi > min_gap else None


def sustainable_rate(levels: list[Level], share: float) -> dict[str, Any]:
    """The highest measured rate whose goodput share showed `share`, with its bracket and an interpolated estimate.

    Returns:
        {"rate": measured rate or None, "bound": "measured" | "at least" (nothing failed) | "below" (nothing
        passed: below the lowest rate tried) | "not measured", "bracket": [lo, hi], "interpolated": rate where the share line
        between lo and hi crosses `share`, or None}.
    """
    lo, hi = bracket(levels, share)
    by_rate = {lv["rate"]: lv for lv in levels if lv.get("rate") is not None}
    interp = None
    if lo is not None and hi is not None:
        s_lo, s_hi = by_rate[lo]["goodput_share"], by_rate[hi]["goodput_share"]
        interp = lo + (hi - lo) * (s_lo - share) / (s_lo - s_hi) if s_lo > s_hi else lo
    if not by_rate:
        bound = "not measured"
    else:
        bound = "at least" if hi is None else "below" if lo is None else "measured"
    return {"rate": lo, "bound": bound, "bracket": [lo, hi], "interpolated": interp, "share": share}


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The sustainable rate over independent rate searches: the lowest run's rate (what every run showed), the
    spread of the runs' rates, and each run's own result. A run that showed no rate makes the combined rate None."""
    if not runs:
        return {"rate": None, "bound": "not measured", "runs": [], "spread": None}
    rates = [r["rate"] for r in runs]
    bounds = {r["bound"] for r in runs}
    if any(r is None for r in rates):
        bound = "not measured" if bounds == {"not measured"} else "below"
        return {"rate": None, "bound": bound, "runs": runs, "spread": None, "bracket": [None, min((r["bracket"][1] for r in runs if r["bracket"][1]), default=None)]}
    worst = min(runs, key=lambda r: r["rate"])
    return {"rate": worst["rate"], "bound": "at least" if bounds == {"at least"} else "measured", "bracket": worst["bracket"],
            "interpolated": worst.get("interpolated"), "runs": runs, "spread": [min(rates), max(rates)], "share": worst.get("share")}
