"""ROUGE through evaluate with the repo's metric module, its CI, fidelity and the paired difference."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from score import ROUGE_MODULE, fidelity, rouge, score
from stats import paired_bootstrap

PREDS = ["council freezes taxes", "storm closes schools", "new park opens downtown"]
REFS = ["council freezes property taxes", "storm closes all schools", "city opens new park"]


def rows(preds: list[str]) -> list[dict]:
    return [{"id": str(i), "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, REFS))]


def test_rouge_on_known_strings() -> None:
    per_row = rouge(PREDS, REFS, seed=0, per_row=True)
    # "council freezes taxes" vs "council freezes property taxes": P=3/3, R=3/4 -> F=6/7
    assert per_row["rouge1"][0] == pytest.approx(6 / 7)
    # rouge2: bigrams "council freezes" match; "freezes taxes" does not -> P=1/2, R=1/3 -> F=0.4
    assert per_row["rouge2"][0] == pytest.approx(0.4)
    agg = rouge(PREDS, REFS, seed=0)
    for t in ["rouge1", "rouge2", "rougeL", "rougeLsum"]:
        assert agg[f"{t}_low"] <= agg[t] <= agg[f"{t}_high"]
    assert agg == rouge(PREDS, REFS, seed=0), "seeded bootstrap must be reproducible"


def test_rouge_matches_rouge_score_directly() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    assert rouge(PREDS, REFS, seed=0, per_row=True)["rougeL"] == pytest.approx(expected)


def test_identical_predictions_score_one() -> None:
    agg = rouge(REFS, REFS, seed=0)
    assert agg["rouge1"] == agg["rougeL"] == agg["rouge1_low"] == 1.0


def test_fidelity_counts_and_first_difference() -> None:
    f = fidelity(rows(PREDS), rows(["council freezes taxes", "storm shuts schools", "new park opens downtown"]))
    assert (f["identical"], f["compared"], f["fidelity"]) == (2, 3, pytest.approx(2 / 3))
    assert f["first_difference"] == {"id": "1", "prediction": "storm closes schools", "reference_prediction": "storm shuts schools"}


def test_score_against_itself_is_lossless_and_not_significant() -> None:
    s = score(rows(PREDS), rows(PREDS), rows(PREDS), seed=0, bootstrap_samples=200, confidence=0.95)
    assert s["fidelity"] == 1.0 and s["first_difference"] is None and s["baseline_identical"] == 1.0
    assert s["rougeL_delta"] == 0.0 and s["rougeL_significant"] is False


def test_paired_bootstrap_known_shift() -> None:
    a = [0.5, 0.6, 0.7, 0.8]
    delta, lo, hi = paired_bootstrap([x + 0.1 for x in a], a, n_samples=500, seed=0)
    assert delta == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_identical_predictions_get_identical_aggregate_scores() -> None:
    """The seed read 0.001 ROUGE differences as gains; identical headlines must score exactly the same."""
    import evaluate

    evaluate.load(ROUGE_MODULE)  # touching evaluate in between must not shift the bootstrap
    assert rouge(PREDS, REFS, seed=5) == rouge(PREDS, REFS, seed=5)
