"""Lossless checks: headlines and token ids against the reference technique's."""

from __future__ import annotations

from typing import Any

# Machine epsilon (spacing of numbers near 1) per dtype: the "resolution" of the near-tie rule
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def fidelity(records: list[dict[str, Any]], reference: list[dict[str, Any]], key: str = "prediction") -> dict[str, Any]:
    """How many outputs (`key`: the headline, or the generated token ids) equal the reference technique's on the
    same rows, and the first that differs."""
    ref = {r["id"]: r[key] for r in reference if r.get(key) is not None}
    pairs = [(r, ref[r["id"]]) for r in records if r.get(key) is not None and r["id"] in ref]
    same = sum(r[key] == p for r, p in pairs)
    first = next(({"id": r["id"], "prediction": r[key], "reference_prediction": p} for r, p in pairs if r[key] != p), None)
    return {"fidelity": same / len(pairs) if pairs else None, "identical": same, "compared": len(pairs), "first_difference": first}


def token_check(records: list[dict[str, Any]], reference: list[dict[str, Any]], dtype: str | None, units: float) -> dict[str, Any]:
    """Compare generated token ids with the reference technique's, row by row, and classify each row.

    identical: the same ids. near-tie: the ids first differ at a step where the reference's relative
    top-2 logit margin is at most `units` x the dtype's machine epsilon (the technique's own margin when
    the reference has none): two tokens within rounding of each other, so a different but equally valid
    order of floating-point operations may pick either. real difference: any other differing row.
    Rows without token ids (older records, engines that give none) are compared as strings and left unclassified.

    Args:
        records / reference: generation records with token_ids and margins.
        dtype: the technique's compute dtype (perf.json), for the resolution.
        units: how many epsilons count as a tie (params score.near_tie_units).
    """
    eps = EPS.get(str(dtype))
    ref = {r["id"]: r for r in reference if r.get("prediction") is not None}
    counts = {"identical": 0, "near_tie": 0, "real_difference": 0, "unclassified": 0}
    differing = []
    for r in records:
        q = ref.get(r["id"])
        if r.get("prediction") is None or q is None:
            continue
        a, b = r.get("token_ids"), q.get("token_ids")
        if not a or not b:
            counts["identical" if r["prediction"] == q["prediction"] else "unclassified"] += 1
            continue
        if a == b:
            counts["identical"] += 1
            continue
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        margins = q.get("margins") or r.get("margins") or []
        margin = margins[step] if step < len(margins) else None
        if not margins or eps is None:  # no margins recorded at all (an engine without logits): undecidable, not "real"
            kind = "unclassified"
        else:  # past the reference's last margin the lengths differ: a real difference
            kind = "near_tie" if margin is not None and margin <= units * eps else "real_difference"
        counts[kind] += 1
        differing.append({"id": r["id"], "step": step, "margin": margin, "class": kind})
    rule = (f"near-tie: at the first differing token the reference's relative top-2 logit margin (top1 - top2) / max(1, |top1|) "
            f"is <= {units:g} x machine epsilon of {dtype} ({units * eps:.3g})" if eps is not None
            else f"near-tie not decidable: no resolution known for dtype {dtype!r}")
    return {"basis": "token_ids", "compared": sum(counts.values()), **counts, "rule": rule, "differing": differing}
