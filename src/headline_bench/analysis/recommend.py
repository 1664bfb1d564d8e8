"""The Pareto front and the report's recommendation rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from headline_bench.analysis.rows import Row
from headline_bench.analysis.stats import finite
from headline_bench.analysis.verdicts import ELIGIBLE_STATES


def pareto_front(rows: list[Row], x: str, y: str) -> list[str]:
    """Techniques no other technique beats on both axes (lower `x` and higher `y` are better), by `x`.

    A point is dominated when another has x <= and y >= with one of them strict. Rows lacking either
    number (skipped, unscored) are left out.
    """
    pts = [(r[x], r[y], r["technique"]) for r in rows if finite(r.get(x)) and finite(r.get(y))]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in pts)]
    return [name for _, _, name in sorted(front)]


ELIGIBLE = "among eligible techniques"


ELIGIBLE_DEF = ("the reference (baseline), a technique whose quality state is non-inferior (the lower end of its simultaneous interval "
                "of ΔROUGE-L is above -score.margin), a technique whose fidelity to baseline is within bound (teacher-forced KL, "
                "Fidelity to baseline) and whose ROUGE state is not worse, or a lossless technique equivalent to an eligible reference")


def _pick(scenario: str, pool: list[Row], key: Callable[[Row], Any], rule: str, value: Callable[[Row], str], empty: str) -> Row:
    pool = [r for r in pool if key(r) is not None]
    if not pool:
        return {"scenario": scenario, "choice": None, "rule": rule, "value": empty}
    best = min(pool, key=key)
    return {"scenario": scenario, "choice": best["technique"], "rule": rule, "value": value(best)}


def _num(r: Row, k: str) -> float | None:
    return r[k] if finite(r.get(k)) else None


def eligible(r: Row) -> bool:
    """Quality settled well enough to be chosen: by ROUGE (non-inferior, or equivalent to an eligible reference), or by
    fidelity within bound where ROUGE has not found it worse. Why fidelity counts: on the defaults ROUGE needs
    score.min_rows (400) rows and the quality set has 100, so without it no lossy technique could ever be picked; a
    technique within the fidelity bounds moves baseline's next-token distributions no more than a good 4-bit quantization."""
    if r.get("skipped"):
        return False
    state = r.get("quality_effective", r.get("quality_state"))
    return state in ELIGIBLE_STATES or (r.get("fidelity_state") == "within bound" and state != "worse")


def excluded(rows: list[Row]) -> list[str]:
    """Why each technique that ran is not eligible: its state, and where undecided the rows that would decide it and which way."""
    out = []
    for r in rows:
        if r.get("skipped") or eligible(r):
            continue
        state = r.get("quality_effective") or r.get("quality_state") or "no quality comparison"
        fidelity = f"; fidelity {r['fidelity_state']}" if r.get("fidelity_state") else ""
        if state in ("inconclusive", "too few rows"):
            need = (f"~{r['rows_to_decide']} rows would decide it {r['rows_to_decide_state']}" if r.get("rows_to_decide_state")
                    else f"needs {r['rows_to_decide']} rows" if r.get("rows_to_decide") else "no row count decides it")
            state = f"{state} at n={r.get('rougeL_delta_rows', r.get('rows'))} ({need})"
        if r.get("quality_state") == "equivalent":
            state = f"equivalent to {r.get('quality_reference')}, which is {state}"
        out.append(f"{r['technique']}: {state}{fidelity}")
    return out


def _represented(r: Row) -> bool:
    """Outputs equivalent or identical to a reference's: that reference stands for it in the quality pick."""
    return r.get("quality_state") == "equivalent" or (r["technique"] != "baseline" and r.get("baseline_identical") == 1)


def recommend(rows: list[Row], balanced_within: float, gpus: int = 0, speed: Callable[[Row, Row], str] | None = None,
              memory_tie: float = 0.02) -> list[Row]:
    """The seed's five scenarios, each chosen by the rule printed beside it, among eligible techniques only.

    Speed uses seconds per generated token (s_per_token), so a technique writing shorter headlines does not
    win by it; `speed(best, other)` is other's speed verdict against best (analysis/latency.py), and the runners-up
    that are tied with the pick, or not resolved from it, are named in a note. Skipped techniques are never chosen.
    Memory: peaks within `memory_tie` (a share) of the lowest are tied; the tie goes to the technique whose speed ratio
    interval shows it faster than every other tied one, else by PRECEDENCE among those not shown slower.
    Quality: a technique counts as better than baseline only when the lower end of its ΔROUGE-L interval (the one its
    state was decided from) clears `balanced_within` (a gain); the highest-quality pick is the highest ROUGE-L among
    the gains, else baseline, and the balanced pick's "best" is that technique's ROUGE-L. Techniques whose outputs are
    equivalent or identical to their reference's are represented by it.

    Args:
        rows: headline() rows after resolve_equivalents().
        balanced_within: the balanced pick's ROUGE-L tolerance (absolute) below the best eligible ROUGE-L.
        gpus: GPUs on this machine; the multi-GPU scenario needs at least 2.
        speed: speed verdict between two rows (default: never compared).
        memory_tie: the memory tie rule above.

    Returns:
        [{scenario, choice (technique or None), rule, value}], plus `note` where a pick is a close call.
    """
    ran = [r for r in rows if not r.get("skipped")]
    ok = [r for r in ran if eligible(r)]
    why = "; ".join(excluded(rows))
    none_ok = "none: no technique that ran here is eligible" + (f" ({why})" if why else "")
    measures = sorted({r["memory_measure"] for r in ok}) or ["peak memory"]

    def fastest(scenario: str, pool: list[Row], rule: str, value: Callable[[Row], str]) -> Row:
        rec = _pick(scenario, pool, lambda r: _num(r, "s_per_token"), rule, value, none_ok)
        best = next((r for r in pool if r["technique"] == rec["choice"]), None)
        verdicts = {r["technique"]: speed(best, r) for r in pool if best and speed and r is not best and finite(r.get("s_per_token"))}
        notes = [f"{label} {', '.join(n for n, v in verdicts.items() if test(v))}" for label, test in
                 (("tied (ratio interval within the tie bounds) with", lambda v: v == "tied"),
                  ("not resolved from", lambda v: v == "unresolved" or v.startswith("n/a")))
                 if any(test(v) for v in verdicts.values())]
        if notes:
            rec["note"] = "; ".join(notes)
        return rec

    recs = [fastest("low latency", ok, f"lowest seconds per generated token (mean latency / mean new tokens) {ELIGIBLE}",
                    lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, P50 {r['latency_s_p50']:.3f} s")]
    mem = [r for r in ok if finite(r.get("peak_memory_mb"))]
    low = min((r["peak_memory_mb"] for r in mem), default=None)
    tied_mem = [r for r in mem if low is not None and r["peak_memory_mb"] <= low * (1 + memory_tie)]
    rule = (f"lowest peak memory ({' / '.join(measures)}) {ELIGIBLE}; peaks within {memory_tie:.0%} of the lowest are tied, and the tie goes to "
            f"the one whose ms/token ratio interval shows it faster than the other tied ones, else by precedence ({PRECEDENCE_RULE})")
    if not tied_mem:
        rec = {"scenario": "memory-constrained", "choice": None, "rule": rule, "value": none_ok}
    else:
        pick, how = break_tie(tied_mem, speed)
        rec = {"scenario": "memory-constrained", "choice": pick["technique"], "rule": rule, "value": f"{pick['peak_memory_mb']:.0f} MB {pick['memory_measure']}"}
        if len(tied_mem) > 1:
            rec["note"] = ("tied on memory with " + ", ".join(f"{r['technique']} ({r['peak_memory_mb']:.0f} MB)" for r in tied_mem if r is not pick)
                           + f"; {how}")
    recs.append(rec)
    multi = [r for r in rows if r["multi_gpu"]]
    rule = f"highest tokens/s {ELIGIBLE}, that set parallel/device_map and ran on at least 2 GPUs"
    if gpus < 2:
        recs.append({"scenario": "multi-GPU", "choice": None, "rule": rule, "value": f"none: this machine has {gpus} GPU(s); the scenario needs at least 2"})
    else:
        skipped = "; ".join(f"{r['technique']}: {r['skipped']}" for r in multi if r.get("skipped")) or "no technique sets parallel or device_map"
        recs.append(_pick("multi-GPU", [r for r in ok if r["multi_gpu"]], lambda r: -r["tokens_per_s"] if finite(r.get("tokens_per_s")) else None,
                          rule, lambda r: f"{r['tokens_per_s']:.1f} tokens/s", f"none ran on this machine: {skipped}"))
    recs.append(highest_quality(ok, balanced_within, none_ok))
    top = best_quality(ok, balanced_within)
    best = top["rougeL"] if top else None
    near = [r for r in ok if best is not None and finite(r.get("rougeL")) and r["rougeL"] >= best - balanced_within]
    recs.append(fastest("balanced", near, f"fewest seconds per generated token {ELIGIBLE}, within {balanced_within} ROUGE-L of the best of them "
                        f"(a ROUGE-L above baseline's counts only when its ΔROUGE-L interval's lower end clears {balanced_within})"
                        + (f" ({top['technique']}: {best:.4f})" if top else ""),
                        lambda r: f"{1000 * r['s_per_token']:.1f} ms/token, ROUGE-L {r['rougeL']:.4f}"))
    return recs


PRECEDENCE_RULE = "baseline, then techniques equivalent to their reference, then the rest in params order"


def break_tie(pool: list[Row], speed: Callable[[Row, Row], str] | None) -> tuple[Row, str]:
    """(pick, how) among rows tied on another measure: the fastest by ms/token when its ratio interval shows every other
    one slower (speed(fastest, other) == "slower"), else the first by PRECEDENCE_RULE among the fastest and those not shown
    slower than it. `pool` is in params order."""
    timed = [r for r in pool if finite(r.get("s_per_token"))]
    if not timed:
        return _by_precedence(pool), f"no speed to compare; by precedence ({PRECEDENCE_RULE})"
    fastest = min(timed, key=lambda r: r["s_per_token"])
    verdicts = {r["technique"]: speed(fastest, r) if speed else "n/a" for r in pool if r is not fastest}
    if all(v == "slower" for v in verdicts.values()):
        return fastest, "faster than the other tied ones by the ms/token ratio interval"
    contenders = [r for r in pool if r is fastest or verdicts[r["technique"]] != "slower"]
    pick = _by_precedence(contenders)
    return pick, (f"speed does not separate {', '.join(r['technique'] for r in contenders)}; by precedence ({PRECEDENCE_RULE})")


def _by_precedence(pool: list[Row]) -> Row:
    rank = [0 if r["technique"] == "baseline" else 1 if r.get("quality_state") == "equivalent" else 2 for r in pool]
    return pool[rank.index(min(rank))]


def gain(r: Row, by: dict[str, Row], tie: float) -> bool:
    """Quality credibly above baseline: the lower end of the ΔROUGE-L interval vs baseline clears `tie` (an equivalent
    technique takes its reference's)."""
    if r.get("quality_state") == "equivalent":
        r = by.get(r.get("quality_reference") or "", {})
    return r.get("rougeL_delta_vs", "baseline") == "baseline" and finite(r.get("rougeL_delta_low")) and r["rougeL_delta_low"] > tie


def best_quality(ok: list[Row], tie: float) -> Row | None:
    """The quality level the picks measure against: the highest ROUGE-L among the gains, else baseline's (a point above
    baseline's with an interval that does not clear the tie is no gain); the highest ROUGE-L when baseline is not eligible."""
    by = {r["technique"]: r for r in ok}
    scored = [r for r in ok if finite(r.get("rougeL")) and not _represented(r)]
    gains = [r for r in scored if gain(r, by, tie)]
    base = [r for r in scored if r["technique"] == "baseline"]
    return max(gains, key=lambda r: r["rougeL"]) if gains else base[0] if base else max(scored, key=lambda r: r["rougeL"], default=None)


def highest_quality(ok: list[Row], tie: float, empty: str) -> Row:
    """The quality pick by the rule recommend() states: references stand for their copies; a gain needs its interval."""
    rule = (f"highest mean ROUGE-L {ELIGIBLE} among techniques whose ΔROUGE-L interval vs baseline has its lower end above {tie} (a gain), "
            "else baseline; techniques with outputs equivalent or identical to their reference's are represented by it")
    pick = best_quality(ok, tie)
    if pick is None:
        return {"scenario": "highest quality", "choice": None, "rule": rule, "value": empty}
    rec = {"scenario": "highest quality", "choice": pick["technique"], "rule": rule, "value": f"ROUGE-L {pick['rougeL']:.4f}"}
    above = [f"{r['technique']} ({r['rougeL']:.4f}, ΔROUGE-L low {r['rougeL_delta_low']:+.4f})" for r in ok if r is not pick and finite(r.get("rougeL"))
             and r["rougeL"] > pick["rougeL"] and finite(r.get("rougeL_delta_low")) and not _represented(r)]
    if above:
        rec["note"] = f"higher point estimate but no gain (interval's lower end not above {tie}): " + ", ".join(above)
    return rec
