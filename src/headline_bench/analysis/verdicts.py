"""Quality states: one rule, decided from the simultaneous interval that the report prints beside it.

The rule (docs/methods.md "Quality verdicts"), for a comparison of per-row ΔROUGE-L = technique - its reference:
- the comparison belongs to a family declared in params (`score.family`: lossy techniques vs baseline;
  `score.model_comparisons`: another model vs baseline, a family of its own). The family is fixed by params, not by
  what ran: a member skipped on this machine still counts in k.
- its interval (stats.mean_interval: the paired t interval, each end widened to Hall's skewness-corrected t where that
  is wider) is at the simultaneous level 1 - (1 - score.confidence) / k (Bonferroni), so the k intervals of a family
  cover their true differences together with probability >= score.confidence;
- below `score.min_rows` rows no state is given ("too few rows"); else **non-inferior** when the lower end is above
  -score.margin (an absolute ROUGE-L difference); **worse** when the upper end is below -margin (the loss is beyond
  the margin); else **inconclusive**, with the note "significantly below the reference, not beyond the margin" when
  the upper end is below 0 but not below -margin. A non-inferior interval can also lie below 0: that is noted
  "significantly below, within the margin".
Because k comes from params and each comparison needs only its own rows, the score stage decides each state on
its own and the report prints the same one: score.json, summary.json and report.md cannot disagree.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from headline_bench.analysis.stats import INTERVAL_METHOD, finite, mean_interval, t_quantile
from headline_bench.errors import InputError

if TYPE_CHECKING:
    from headline_bench.settings import Score as ScoreSettings

STATES = ("non-inferior", "worse", "inconclusive", "too few rows")
SIGNIFICANTLY_BELOW = "significantly below the reference, not beyond the margin"
LOSSY, MODEL = "lossy", "model comparison"


def family_of(name: str, techniques: dict[str, Any], score_params: ScoreSettings) -> tuple[str, int]:
    """(family, k) of a technique's quality comparison against baseline, from params only.

    Lossless techniques (those with a `reference`) whose differences turn out real are tested at the lossy family's
    level without changing k (the family's guarantee covers its declared members; these extra tests are each at the
    same, stricter, per-comparison level).

    Raises:
        InputError: a lossy technique that params put in no family (so no one could say at what level it is tested).
    """
    family, models = list(score_params.family), list(score_params.model_comparisons)
    if name in models:
        return MODEL, len(models)
    if name in family or getattr(techniques.get(name), "reference", None):
        return LOSSY, max(len(family), 1)
    raise InputError(f"score.family: technique '{name}' changes the model's output but is in neither score.family nor "
                     "score.model_comparisons; add it to one")


def simultaneous_level(confidence: float, k: int) -> float:
    """Two-sided level of each of k intervals so that all k cover together with probability >= confidence (Bonferroni)."""
    return 1 - (1 - confidence) / max(k, 1)


def decide(low: float | None, high: float | None, margin: float, rows: int, min_rows: int) -> tuple[str, str | None]:
    """(state, note) from the printed interval; see the module docstring for the rule."""
    if rows < min_rows or not (finite(low) and finite(high)):
        return "too few rows", None
    if low > -margin:
        note = "significantly above the reference" if low > 0 else "significantly below, within the margin" if high < 0 else None
        return "non-inferior", note
    if high < -margin:
        return "worse", None
    return "inconclusive", SIGNIFICANTLY_BELOW if high < 0 else None


def rows_needed(gap: float, sd: float, level: float, power: float) -> int:
    """Rows at which the interval's end clears a boundary `gap` away from the true difference with probability `power`.

    One end of the two-sided interval at `level` is a one-sided bound at (1 - level) / 2, so
    n = ((t_{1-(1-level)/2, n-1} + t_{power, n-1}) * sd / gap)^2, iterated from the normal value until n is stable
    (the t quantiles keep the power at 80% at small n, which tests/test_verdicts_sim.py checks).
    """
    z = NormalDist().inv_cdf
    n = max(2, math.ceil(((z(1 - (1 - level) / 2) + z(power)) * sd / gap) ** 2))
    for _ in range(50):
        nxt = max(2, math.ceil(((t_quantile(1 - (1 - level) / 2, n - 1) + t_quantile(power, n - 1)) * sd / gap) ** 2))
        if nxt == n:
            break
        n = nxt
    return n


def rows_to_decide(delta: float | None, sd: float | None, margin: float, level: float, power: float, min_rows: int) -> tuple[int | None, str | None]:
    """(rows, state they would decide) if the true difference were the observed one and the per-row sd the observed sd.

    Both decisions sit on the same boundary, -margin: non-inferior needs the lower end above it (reachable when
    delta > -margin, gap delta + margin), worse needs the upper end below it (when delta < -margin, gap -margin - delta).
    (None, None) when neither can happen (sd 0, or the difference sits on -margin).
    """
    if not (finite(delta) and finite(sd)) or sd <= 0:
        return None, None
    gap, state = (delta + margin, "non-inferior") if delta > -margin else (-margin - delta, "worse")
    if gap <= 0:
        return None, None
    return max(rows_needed(gap, sd, level, power), min_rows), state


def compare(diffs: list[float], family: str, k: int, score_params: ScoreSettings) -> dict[str, Any]:
    """One quality comparison: per-row differences -> the interval, state and planning numbers score.json keeps."""
    s = score_params
    level = simultaneous_level(s.confidence, k)
    t = mean_interval(diffs, level)
    state, note = decide(t["low"], t["high"], s.margin, t["rows"], s.min_rows)
    need, would = (None, None)
    if state in ("inconclusive", "too few rows"):
        need, would = rows_to_decide(t["delta"], t["sd"], s.margin, level, s.power, s.min_rows)
        if state == "too few rows" and need is None:
            need = s.min_rows
    return {"rougeL_delta": t["delta"], "rougeL_delta_low": t["low"], "rougeL_delta_high": t["high"], "rougeL_delta_sd": t["sd"],
            "rougeL_delta_rows": t["rows"], "interval_level": level,
            "interval_method": f"{INTERVAL_METHOD}; Bonferroni", "family": family,
            "comparisons": k, "noninferiority_margin": s.margin, "quality_state": state, "quality_note": note,
            "rows_to_decide": need, "rows_to_decide_state": would}


def mlperf_99(rouge_l: Any, reference_rouge_l: Any) -> bool | None:
    """MLPerf's accuracy check, shown for information: the point estimate reaches 99% of the reference's."""
    return bool(rouge_l >= 0.99 * reference_rouge_l) if finite(rouge_l) and finite(reference_rouge_l) else None


ELIGIBLE_STATES = ("reference", "non-inferior")


def resolve_equivalents(rows: list[dict[str, Any]]) -> None:
    """Give each "equivalent" row its reference's state as `quality_effective` (speculative takes target_only's, with
    its rows to decide); every other row's effective state is its own. Rows are changed in place."""
    by = {r["technique"]: r for r in rows}
    for r in rows:
        r["quality_effective"] = r.get("quality_state")
    for r in rows:
        ref = by.get(r.get("quality_reference") or "")
        if r.get("quality_state") == "equivalent" and ref:
            r["quality_effective"] = ref.get("quality_state")
            for k in ("rows_to_decide", "rows_to_decide_state"):
                if ref.get(k) is not None:
                    r[k] = ref[k]
