"""Lossless checks: headlines and token ids against the reference technique's."""

from __future__ import annotations

from typing import Any

import numpy as np

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


def device_kind(env: dict[str, Any] | None, device: str | None) -> str:
    """What numerics depend on besides model and dtype: the GPU's name, or the CPU's family/model and kernel-relevant ISA
    flags (bf16 kernels differ between a CPU with avx512_bf16/AMX and one without). From perf.json's env."""
    env = env or {}
    if str(device or "cpu").startswith("cuda"):
        return f"cuda {env.get('gpu_name') or env.get('device') or '?'}"
    return f"cpu {env.get('cpu_id', '?')} [{env.get('cpu_isa', '?')}]"


def calibration_key(model: str | None, env: dict[str, Any] | None, device: str | None, dtype: str | None) -> str:
    """The calibration file's key: "<model> | <device kind> | <dtype>" (scripts/calibrate_near_tie.py writes it)."""
    return f"{model} | {device_kind(env, device)} | {dtype}"


def calibrated(calibration: dict[str, Any], key: str) -> dict[str, Any]:
    """The calibration entry measured for exactly this model, device kind and dtype; {} where there is none."""
    return calibration.get(key) or {}


def first_difference(a: list[int], b: list[int]) -> int:
    """The first step at which two token-id sequences differ (the shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def near_tie_threshold(dtype: str | None, key: str, calibration: dict[str, Any], units: float) -> tuple[float | None, str]:
    """The relative top-2 margin at or below which a differing token counts as a near-tie, and the rule in words.

    Measured where a calibration for this key (calibration_key()) exists: `threshold` is where an exponential tail
    fitted to the reference's own numeric noise in that margin puts the chance that any of a whole check's positions
    carries noise above it at `alpha` (quality/calibrate.py: tail_threshold). Elsewhere `units` x the dtype's machine
    epsilon, labelled uncalibrated. None (undecidable) for a dtype with neither.
    """
    entry = calibrated(calibration, key)
    if entry and finite(entry.get("threshold")):
        return float(entry["threshold"]), (f"near-tie: at the first differing token the reference's relative top-2 logit margin (top1 - top2) / "
                                          f"max(1, |top1|) is <= {entry['threshold']:.3g}, where numeric noise exceeds it anywhere in a "
                                          f"{entry['check_positions']}-position check with probability {entry['alpha']:g} (exponential tail of "
                                          f"{entry['positions']} noise values measured on other rows; {key})")
    eps = EPS.get(str(dtype))
    if eps is None:
        return None, f"near-tie not decidable: no calibration for {key} and no resolution known for dtype {dtype!r}"
    return units * eps, (f"near-tie (uncalibrated: no entry for {key}): at the first differing token the reference's relative top-2 logit margin "
                         f"(top1 - top2) / max(1, |top1|) is <= {units:g} x machine epsilon of {dtype} ({units * eps:.3g})")


# fewest shared-prefix positions from which a row's logit perturbation is judged (perturbation())
MIN_ROW_POSITIONS = 5


def row_cap(key: str, calibration: dict[str, Any]) -> float | None:
    """The calibrated cap on one row's perturbation (its 0.9 quantile of |Δ margin|): where the exponential tail of that
    statistic over the calibration's rows puts the chance that any row of a whole check exceeds it at `alpha`;
    None where this key has no calibration."""
    entry = calibrated(calibration, key)
    return float(entry["row_cap"]) if finite(entry.get("row_cap")) else None


def perturbation_cap(threshold: float | None, cap: float | None) -> float | None:
    """The most a technique may move the relative top-2 margin on its worst row and still count as numerics: the
    calibrated row cap; the near-tie threshold itself where uncalibrated."""
    return cap if cap is not None else threshold


def perturbation(records: list[dict[str, Any]], reference: list[dict[str, Any]], cap: float | None) -> dict[str, Any]:
    """How far the technique moves the reference's logits where both still emit the same tokens, judged on its worst row.

    Over every position before a row's first differing token (identical rows: all of them) both runs recorded their
    own relative top-2 margin for the same argmax; |margin - reference margin| there is the technique's perturbation,
    the quantity the calibration measures for equivalent ways of computing the reference. Each row with at least
    MIN_ROW_POSITIONS such positions gets its 0.9 quantile; the worst row against `cap` says whether the technique
    moves margins by more than numeric noise anywhere (`within_noise`; None when no row can be judged or no cap).
    A perturbation confined to a few rows (a mask bug at a cache-bucket edge) shows on its worst row, where a pooled
    quantile would dilute it."""
    ref = {r["id"]: r for r in reference}
    per_row: dict[str, float] = {}
    positions = 0
    for r in records:
        q = ref.get(r["id"]) or {}
        a, b, ma, mb = r.get("token_ids"), q.get("token_ids"), r.get("margins"), q.get("margins")
        if not (a and b and ma and mb):
            continue
        step = first_difference(a, b)
        gaps = [abs(x - y) for x, y in zip(ma[:step], mb[:step]) if finite(x) and finite(y)]
        positions += len(gaps)
        if len(gaps) >= MIN_ROW_POSITIONS:
            per_row[r["id"]] = float(np.quantile(gaps, 0.9))
    worst = max(per_row, key=per_row.get) if per_row else None
    judged = cap is not None and worst is not None
    return {"positions": positions, "rows_judged": len(per_row), "worst_row": worst, "worst_q0.9": per_row.get(worst) if worst else None,
            "cap": cap, "within_noise": (per_row[worst] <= cap) if judged else None}


def token_check(records: list[dict[str, Any]], reference: list[dict[str, Any]], threshold: float | None, rule: str,
                cap: float | None = None) -> dict[str, Any]:
    """Compare generated token ids with the reference technique's, row by row, and classify each row.

    identical: the same ids. near-tie: the ids first differ at a step where the reference's relative
    top-2 logit margin is at most `threshold` (the technique's own margin when the reference has none): two tokens
    within the reference's own numeric noise of each other, so a different but equally valid order of floating-point
    operations may pick either; and the technique's perturbation of the margins where the tokens still agree is
    within `cap` (perturbation()). A lossy technique's first differences also fall where margins are small (a
    perturbed model flips the closest calls first), so the margin at the difference alone cannot tell quantization
    from numerics: on bf16 SmolLM2, quant4's differences sit at margins like kv_cache's, its perturbation is ~10x.
    real difference: any other differing row (beyond the cap: every one). unclassified: rows without token ids (older
    records, engines that give none; compared as strings), or near-ties whose perturbation cannot be judged.

    Args:
        records / reference: generation records with token_ids and margins.
        threshold / rule: from near_tie_threshold().
        cap: from perturbation_cap(); None: the perturbation is recorded but not judged (the margin rule alone).
    """
    ref = {r["id"]: r for r in reference if r.get("prediction") is not None}
    counts = {"identical": 0, "near_tie": 0, "real_difference": 0, "unclassified": 0}
    moved = perturbation(records, reference, cap)
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
        step = first_difference(a, b)
        margins = q.get("margins") or r.get("margins") or []
        margin = margins[step] if step < len(margins) else None
        if not margins or threshold is None:  # no margins recorded at all (an engine without logits): undecidable, not "real"
            kind = "unclassified"
        else:  # past the reference's last margin the lengths differ: a real difference
            kind = "near_tie" if margin is not None and margin <= threshold else "real_difference"
            if kind == "near_tie" and cap is not None and not moved["within_noise"]:
                kind = "unclassified" if moved["within_noise"] is None else "real_difference"
        counts[kind] += 1
        differing.append({"id": r["id"], "step": step, "margin": margin, "class": kind})
    if cap is not None:
        rule += (f"; and the technique's own perturbation of that margin where the tokens still agree is <= {cap:.3g} on its worst row "
                 f"(per row: 0.9 quantile of |Δ margin| over the positions before its first difference, rows with >= {MIN_ROW_POSITIONS})")
    return {"basis": "token_ids", "compared": sum(counts.values()), **counts, "threshold": threshold, "rule": rule,
            "perturbation": moved, "differing": differing}


def equivalence(check: dict[str, Any], dtype: str | None, reference: str) -> str | None:
    """"equivalent to <reference> up to <dtype> numerics (i identical + j near-tie)" when every compared row is identical
    or a near-tie; None when any row differs for real or cannot be classified (then it is a quality comparison)."""
    if not check.get("compared") or check["real_difference"] or check["unclassified"]:
        return None
    return f"equivalent to {reference} up to {dtype} numerics ({check['identical']} identical + {check['near_tie']} near-tie)"
