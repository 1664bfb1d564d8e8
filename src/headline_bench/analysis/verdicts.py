"""Quality states (non-inferior / worse / inconclusive) and the family-wise correction."""

from __future__ import annotations

import math
from statistics import NormalDist

from headline_bench.analysis.rows import Row
from headline_bench.analysis.stats import finite

STATES = ("non-inferior", "worse", "inconclusive")


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    The i-th smallest of k p-values is multiplied by (k - i + 1); adjusted values are made monotone and capped at 1.
    """
    order = sorted(pvalues, key=lambda name: pvalues[name])
    k, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (k - i) * pvalues[name]))
        out[name] = running
    return out


def quality_state(p_value: float, p_noninferior: float, delta: float, confidence: float) -> str:
    """non-inferior / worse / inconclusive from (possibly Holm-adjusted) paired-test p-values.

    non-inferior: p_noninferior < (1 - c) / 2, i.e. the lower end of the c-level interval of the difference
    is above -margin. worse: p_value < 1 - c with a negative difference, i.e. the interval lies below 0.
    A difference inside (-margin, 0) with a tight interval is both; the margin is the gate, so it is
    non-inferior (quality_difference() says it is also significantly lower).
    """
    alpha = 1 - confidence
    if p_noninferior < alpha / 2:
        return "non-inferior"
    if p_value < alpha and delta < 0:
        return "worse"
    return "inconclusive"


def rows_to_decide(delta: float, sd: float, margin: float, confidence: float, comparisons: int = 1) -> int | None:
    """Rows that would decide an inconclusive comparison at the observed mean difference and per-row sd.

    Normal approximation: the interval half-width z * sd / sqrt(n) must fit between the difference and
    -margin (to show non-inferiority) or between the difference and 0 (to show it is worse); the smaller
    n of the two that can happen. z is at level 1 - (1 - c) / comparisons (Bonferroni, a bound on Holm).

    Returns:
        the row count, or None where no n decides it (sd 0, or the difference sits exactly on a boundary).
    """
    if not (finite(delta) and finite(sd)) or sd <= 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(comparisons, 1)))
    gaps = [g for g in (delta + margin, -delta) if g > 0]
    return min(math.ceil((z * sd / g) ** 2) for g in gaps) if gaps else None


def apply_verdicts(rows: list[Row], confidence: float) -> list[str]:
    """Set each row's quality state against the baseline, with Holm's correction across the comparisons.

    baseline is the reference (non-inferior by definition). A technique whose headlines are all identical
    to baseline's is non-inferior without a test; a lossless technique identical to another reference
    (speculative vs target_only) takes that reference's state. Every other row with a paired difference
    is one comparison of the family: its two p-values (difference from 0; non-inferiority at the margin)
    are Holm-adjusted over the family and read by quality_state(); rows_to_decide is set where the state
    is inconclusive.

    Returns:
        the family (technique names tested), in row order.
    """
    by = {r["technique"]: r for r in rows}
    family: list[str] = []
    for r in rows:
        name = r["technique"]
        if r.get("skipped") or not finite(r.get("rougeL_delta_p")):
            continue
        if name == "baseline":
            r |= {"quality_state": "non-inferior", "quality_basis": "the reference"}
        elif r.get("baseline_identical") == 1:
            r |= {"quality_state": "non-inferior", "quality_basis": "identical to baseline"}
        elif r.get("lossless") and r.get("fidelity") == 1 and r.get("fidelity_reference") not in (None, "baseline", name):
            r["quality_basis"] = f"identical to {r['fidelity_reference']}"
        else:
            family.append(name)
    p = holm({n: by[n]["rougeL_delta_p"] for n in family})
    p_ni = holm({n: by[n]["rougeL_delta_p_noninferior"] for n in family})
    for n in family:
        r = by[n]
        state = quality_state(p[n], p_ni[n], r["rougeL_delta"], confidence)
        r |= {"rougeL_delta_p_holm": p[n], "rougeL_delta_p_noninferior_holm": p_ni[n], "quality_state": state, "comparisons": len(family),
              "quality_basis": f"paired test, Holm over {len(family)} comparison(s)",
              "rows_to_decide": rows_to_decide(r["rougeL_delta"], r.get("rougeL_delta_sd"), r["noninferiority_margin"], confidence, len(family))
              if state == "inconclusive" else None}
        if state != "worse" and p[n] < 1 - confidence:
            r["quality_note"] = "significantly above baseline" if r["rougeL_delta"] > 0 else "significantly below baseline, within the margin"
    for r in rows:  # lossless copies of another technique take its state
        ref = by.get(r.get("fidelity_reference") or "")
        if r.get("quality_basis", "").startswith("identical to ") and "quality_state" not in r and ref:
            r["quality_state"] = ref.get("quality_state")
    return family
