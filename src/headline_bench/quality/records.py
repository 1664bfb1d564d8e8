"""score.json: one definition of every field a technique's quality record may hold (built with measure.records.assemble,
so a key set twice or an undeclared key is an error). JSON keys are unchanged, so `dvc metrics diff` still lines up;
fields marked `row=True` go into the report's headline row (analysis/rows.py)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from headline_bench.measure.records import Num, Record, assemble, kept, row


class Score(Record):
    """metrics/techniques/<technique>/score.json."""

    technique: str = Field(description="technique name")
    skipped: str | None = kept("the technique was skipped (perf.json's reason)")
    failed: str | None = kept("the technique failed (perf.json's reason)")
    quality: str | None = kept("why ROUGE is not computed (random weights)")
    fidelity_reference: str | None = row("the technique whose headlines fidelity compares with")
    lossless: bool | None = row("the technique must reproduce its reference exactly")
    confidence: Num | None = row("interval level")
    samples: int | None = kept("rows with a prediction")
    rows: int | None = row("rows scored (a row set aside scores 0)")
    rows_not_scored: int | None = kept("rows without a prediction")
    rows_set_aside: list[Any] | None = row("ids of the rows without a prediction")
    seed: int | None = kept("bootstrap seed (score.seed)")
    bootstrap_samples: int | None = kept("bootstrap resamples")
    rouge1: Num | None = row("mean per-row ROUGE-1 F-measure")
    rouge1_low: Num | None = kept("ROUGE-1 interval, lower end")
    rouge1_high: Num | None = kept("ROUGE-1 interval, upper end")
    rouge2: Num | None = row("mean per-row ROUGE-2 F-measure")
    rouge2_low: Num | None = kept("ROUGE-2 interval, lower end")
    rouge2_high: Num | None = kept("ROUGE-2 interval, upper end")
    rougeL: Num | None = row("mean per-row ROUGE-L F-measure")
    rougeL_low: Num | None = row("ROUGE-L interval, lower end")
    rougeL_high: Num | None = row("ROUGE-L interval, upper end")
    rougeLsum: Num | None = row("mean per-row ROUGE-Lsum F-measure")
    rougeLsum_low: Num | None = kept("ROUGE-Lsum interval, lower end")
    rougeLsum_high: Num | None = kept("ROUGE-Lsum interval, upper end")
    rougeL_delta: Num | None = row("paired mean ROUGE-L difference to baseline")
    rougeL_delta_low: Num | None = row("its interval, lower end")
    rougeL_delta_high: Num | None = row("its interval, upper end")
    rougeL_delta_p: Num | None = kept("two-sided bootstrap p-value of 'no difference' (records before the paired-t rule)")
    rougeL_delta_p_noninferior: Num | None = kept("one-sided bootstrap p-value of 'worse by the margin' (records before the paired-t rule)")
    rougeL_delta_vs: str | None = row("what the paired difference is taken against: baseline, or a lossless technique's reference")
    interval_level: Num | None = row("the simultaneous level of the printed interval: 1 - (1 - confidence) / k")
    interval_method: str | None = row("how the interval of the difference is computed (analysis/stats.mean_interval)")
    family: str | None = row("the family of comparisons it belongs to (params score.family / score.model_comparisons)")
    comparisons: int | None = row("k: comparisons in its family (fixed by params)")
    margin: Num | None = row("non-inferiority margin, absolute ROUGE-L (score.margin)")
    quality_note: str | None = row("a note on the state (e.g. significantly below, within the margin)")
    quality_basis: str | None = row("what the state rests on")
    quality_reference: str | None = row("the technique whose quality a lossless one takes, or that it is compared with")
    rows_to_decide_state: str | None = row("the state the rows to decide would decide")
    quality_set: str | None = row("the file whose rows the ROUGE numbers are over (a quality pass, or the timed rows)")
    quality_source: str | None = row("quality pass / reference (a lossless technique whose timed token ids match) / timed rows")
    quality_taken_from: str | None = row("the technique whose quality pass a lossless technique's quality is taken from")
    quality_source_note: str | None = row("why the timed rows are scored instead of a quality pass")
    timed_rows: int | None = row("timed rows the lossless check (fidelity, token_check) compares")
    check_rows: int | None = row("further untimed rows the lossless check (token_check) compares besides the timed rows (data/lossless)")
    batched_vs_timed: dict[str, Any] | None = row("quality-pass (batched) outputs equal to the timed (batch-1) outputs on the timed rows, by token ids")
    mlperf_99: bool | None = row("MLPerf's point-estimate check: ROUGE-L >= 99% of baseline's (informational)")
    rougeL_delta_sd: Num | None = row("per-row sd of the difference")
    rougeL_delta_rows: int | None = row("rows in the paired comparison")
    rougeL_delta_rows_missing: list[Any] | None = kept("rows the technique has no scores for (scored 0)")
    rougeL_delta_baseline_set_aside: list[Any] | None = kept("rows the baseline has no prediction for (scored 0)")
    rougeL_baseline: Num | None = row("baseline's mean ROUGE-L over the compared rows")
    margin_share: Num | None = kept("non-inferiority margin as a share of baseline ROUGE-L (records before the absolute margin)")
    noninferiority_margin: Num | None = row("absolute non-inferiority margin")
    rougeL_significant: bool | None = kept("the interval excludes 0")
    quality_state: str | None = row("non-inferior / worse / inconclusive / too few rows / equivalent / reference, decided from the printed interval")
    rows_to_decide: int | None = row("rows for score.power power at the observed difference and sd (rows_to_decide_state names the state)")
    baseline_identical: Num | None = row("share of headlines identical to baseline's")
    fidelity: Num | None = row("share of headlines identical to the reference's")
    identical: int | None = row("headlines identical to the reference's")
    compared: int | None = row("headlines compared with the reference's")
    first_difference: dict[str, Any] | None = row("the first row whose headline differs from the reference's")
    token_check: dict[str, Any] | None = row("quality/fidelity.token_check(): identical / near-tie / real difference by token ids")


def outcome_score(name: str, perf: dict[str, Any]) -> dict[str, Any] | None:
    """score.json of a technique whose generate stage was skipped or failed (its outcome, nothing scored), else None.
    Light on purpose: the score stage writes it without importing torch (~2 s of each of 8 skipped stages on a CPU)."""
    outcome = next((k for k in ("skipped", "failed") if k in perf), None)
    return None if outcome is None else assemble(Score, {"technique": name, outcome: perf[outcome]})
