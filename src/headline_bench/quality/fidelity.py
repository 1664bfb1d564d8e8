"""Lossless checks: headlines and token ids against the reference technique's."""

from __future__ import annotations

from typing import Any

from headline_bench.analysis.stats import finite

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


def near_tie_threshold(dtype: str | None, device: str | None, calibration: dict[str, Any], units: float) -> tuple[float | None, str]:
    """The relative top-2 margin at or below which a differing token counts as a near-tie, and the rule in words.

    Measured where a calibration exists: `calibration["<device type>/<dtype>"]["threshold"]` is a high quantile of the
    reference model's own numeric noise in that margin (scripts/calibrate_near_tie.py: the same sequences scored at
    batch 1, at batch 8 with left padding and step by step with a KV cache). Elsewhere `units` x the dtype's machine
    epsilon, labelled uncalibrated. None (undecidable) for a dtype with neither.
    """
    kind = str(device or "cpu").split(":")[0]
    entry = calibration.get(f"{kind}/{dtype}")
    if entry and finite(entry.get("threshold")):
        return float(entry["threshold"]), (f"near-tie: at the first differing token the reference's relative top-2 logit margin (top1 - top2) / "
                                          f"max(1, |top1|) is <= {entry['threshold']:.3g}, the {entry['quantile']:g} quantile of that margin's "
                                          f"numeric noise measured on {kind} in {dtype} ({entry['positions']} positions, {entry['model']})")
    eps = EPS.get(str(dtype))
    if eps is None:
        return None, f"near-tie not decidable: no calibration and no resolution known for dtype {dtype!r}"
    return units * eps, (f"near-tie (uncalibrated for {kind}/{dtype}): at the first differing token the reference's relative top-2 logit margin "
                         f"(top1 - top2) / max(1, |top1|) is <= {units:g} x machine epsilon of {dtype} ({units * eps:.3g})")


def token_check(records: list[dict[str, Any]], reference: list[dict[str, Any]], threshold: float | None, rule: str) -> dict[str, Any]:
    """Compare generated token ids with the reference technique's, row by row, and classify each row.

    identical: the same ids. near-tie: the ids first differ at a step where the reference's relative
    top-2 logit margin is at most `threshold` (the technique's own margin when the reference has none): two tokens
    within the reference's own numeric noise of each other, so a different but equally valid order of floating-point
    operations may pick either. real difference: any other differing row.
    Rows without token ids (older records, engines that give none) are compared as strings and left unclassified.

    Args:
        records / reference: generation records with token_ids and margins.
        threshold / rule: from near_tie_threshold().
    """
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
        if not margins or threshold is None:  # no margins recorded at all (an engine without logits): undecidable, not "real"
            kind = "unclassified"
        else:  # past the reference's last margin the lengths differ: a real difference
            kind = "near_tie" if margin is not None and margin <= threshold else "real_difference"
        counts[kind] += 1
        differing.append({"id": r["id"], "step": step, "margin": margin, "class": kind})
    return {"basis": "token_ids", "compared": sum(counts.values()), **counts, "threshold": threshold, "rule": rule, "differing": differing}


def equivalence(check: dict[str, Any], dtype: str | None, reference: str) -> str | None:
    """"equivalent to <reference> up to <dtype> numerics (i identical + j near-tie)" when every compared row is identical
    or a near-tie; None when any row differs for real or cannot be classified (then it is a quality comparison)."""
    if not check.get("compared") or check["real_difference"] or check["unclassified"]:
        return None
    return f"equivalent to {reference} up to {dtype} numerics ({check['identical']} identical + {check['near_tie']} near-tie)"
