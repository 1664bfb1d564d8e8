"""The Pareto front and the report's recommendation rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from headline_bench.analysis.rows import Row
from headline_bench.analysis.stats import finite


def pareto_front(rows: list[Row], x: str, y: str) -> list[str]:
    """Techniques no other technique beats on both axes (lower `x` and higher `y` are better), by `x`.

    A point is dominated when another has x <= and y >= with one of them strict. Rows lacking either
    number (skipped, unscored) are left out.
    """
    pts = [(r[x], r[y], r["technique"]) for r in rows if finite(r.get(x)) and finite(r.get(y))]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in pts)]
    return [name for _, _, name in sorted(front)]


ELIGIBLE = "among non-inferior techniques"


ELIGIBLE_DEF = ("non-inferior: the lower end of the paired {:.0%} interval of ΔROUGE-L vs baseline is above -margin (a share of baseline "
                "ROUGE-L), Holm-adjusted across the lossy comparisons; headlines identical to baseline's count as non-inferior")


def _pick(scenario: str, pool: list[Row], key: Callable[[Row], Any], rule: str, value: Callable[[Row], str], empty: str) -> Row:
    pool = [r for r in pool if key(r) is not None]
    if not pool:
        return {"scenario": scenario, "choice": None, "rule": rule, "value": empty}
    best = min(pool, key=key)
    return {"scenario": scenario, "choice": best["technique"], "rule": rule, "value": value(best)}


def _num(r: Row, k: str) -> float | None:
    return r[k] if finite(r.get(k)) else None


def excluded(rows: list[Row]) -> list[str]:
    """Why each technique that ran is not eligible: its state, and for inconclusive ones the rows that would decide it."""
    out = []
    for r in rows:
        if r.get("skipped") or r.get("quality_state") == "non-inferior":
            continue
        state = r.get("quality_state") or "no paired difference"
        if state == "inconclusive":
            need = f"~{r['rows_to_decide']} rows would decide it" if r.get("rows_to_decide") else "no row count decides it"
            state = f"inconclusive at n={r.get('rougeL_delta_rows')} ({need})"
        out.append(f"{r['technique']}: {state}")
    return out


def recommend(rows: list[Row], balanced_within: float, gpus: int = 0, tied: Callable[[Row, Row], bool] | None = None) -> list[Row]:
    """The seed's five scenarios, each chosen by the rule printed beside it, among non-inferior techniques only.

    Speed uses seconds per generated token (s_per_token), so a technique writing shorter headlines does not
    win by it; `tied(best, other)` says whether two techniques are within noise of each other, and ties are
    named in a note. Skipped techniques are never chosen.

    Args:
        rows: headline() rows after apply_verdicts().
        balanced_within: the balanced pick's ROUGE-L tolerance (absolute) below the best eligible ROUGE-L.
        gpus: GPUs on this machine; the multi-GPU scenario needs at least 2.
        tied: speed-tie test between two rows (default: never tied).

    Returns:
        [{scenario, choice (technique or None), rule, value}], plus `note` where a pick is a close call.
    """
    ran = [r for r in rows if not r.get("skipped")]
    ok = [r for r in ran if r.get("quality_state") == "non-inferior"]
    why = "; ".join(excluded(rows))
    none_ok = "none: no technique that ran here is non-inferior to baseline" + (f" ({why})" if why else "")
    measures = sorted({r["memory_measure"] for r in ok}) or ["peak memory"]

    def speed(scenario: str, pool: list[Row], rule: str, value: Callable[[Row], str]) -> Row:
        rec = _pick(scenario, pool, lambda r: _num(r, "s_per_token"), rule, value, none_ok)
        best = next((r for r in pool if r["technique"] == rec["choice"]), None)
        ties = [r["technique"] for r in pool if best and r is not best and finite(r.get("s_per_token")) and tied and tied(best, r)]
        if ties:
            rec["note"] = f"tied within noise with {', '.join(ties)}"
        return rec

    recs = [
        speed("low latency", ok, f"lowest seconds per generated token (mean latency / mean new tokens) {ELIGIBLE}",
              lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, P50 {r['latency_s_p50']:.3f} s"),
        _pick("memory-constrained", ok, lambda r: _num(r, "peak_memory_mb"), f"lowest peak memory ({' / '.join(measures)}) {ELIGIBLE}",
              lambda r: f"{r['peak_memory_mb']:.0f} MB {r['memory_measure']}", none_ok),
    ]
    multi = [r for r in rows if r["multi_gpu"]]
    rule = f"highest tokens/s {ELIGIBLE}, that set parallel/device_map and ran on at least 2 GPUs"
    if gpus < 2:
        recs.append({"scenario": "multi-GPU", "choice": None, "rule": rule, "value": f"none: this machine has {gpus} GPU(s); the scenario needs at least 2"})
    else:
        skipped = "; ".join(f"{r['technique']}: {r['skipped']}" for r in multi if r.get("skipped")) or "no technique sets parallel or device_map"
        recs.append(_pick("multi-GPU", [r for r in ok if r["multi_gpu"]], lambda r: -r["tokens_per_s"] if finite(r.get("tokens_per_s")) else None,
                          rule, lambda r: f"{r['tokens_per_s']:.1f} tokens/s", f"none ran on this machine: {skipped}"))
    quality = _pick("highest quality", ok, lambda r: (-r["rougeL"], r.get("s_per_token") or math.inf) if finite(r.get("rougeL")) else None,
                    f"highest mean ROUGE-L (ties broken by fewer seconds per token) {ELIGIBLE}", lambda r: f"ROUGE-L {r['rougeL']:.4f}", none_ok)
    top = next((r for r in ok if r["technique"] == quality["choice"]), None)
    others = sorted((r for r in ok if r is not top and finite(r.get("rougeL"))), key=lambda r: (-r["rougeL"], r.get("s_per_token") or math.inf))
    if top and others:
        nxt = others[0]
        lo, hi = top.get("rougeL_low"), top.get("rougeL_high")
        if nxt["rougeL"] == top["rougeL"]:
            quality["note"] = f"tied with {nxt['technique']} on ROUGE-L; chosen for fewer seconds per token"
        elif finite(lo) and finite(hi) and lo <= nxt["rougeL"] <= hi:
            quality["note"] = f"not clearly better than {nxt['technique']} ({nxt['rougeL']:.4f} lies inside its interval [{lo:.4f}, {hi:.4f}])"
    recs.append(quality)
    best = max((r["rougeL"] for r in ok if finite(r.get("rougeL"))), default=None)
    near = [r for r in ok if best is not None and finite(r.get("rougeL")) and r["rougeL"] >= best - balanced_within]
    recs.append(speed("balanced", near, f"fewest seconds per generated token {ELIGIBLE}, within {balanced_within} ROUGE-L of the best of them"
                      + (f" ({best:.4f})" if best is not None else ""),
                      lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, ROUGE-L {r['rougeL']:.4f}"))
    return recs
