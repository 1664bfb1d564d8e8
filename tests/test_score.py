"""ROUGE through evaluate with the repo's metric module, its CI, fidelity, the paired difference and its state, the
near-tie threshold and the lossless/equivalent path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from headline_bench.analysis.verdicts import decide
from headline_bench.quality.fidelity import (
    EPS,
    calibration_key,
    equivalence,
    fidelity,
    near_tie_threshold,
    perturbation_cap,
    row_cap,
    token_check,
)
from headline_bench.quality.rouge import ROUGE_MODULE, rouge
from headline_bench.quality.score import score
from headline_bench.settings import Score

PREDS = ["council freezes taxes", "storm closes schools", "new park opens downtown"]
REFS = ["council freezes property taxes", "storm closes all schools", "city opens new park"]


S = Score(seed=0, bootstrap_samples=500, confidence=0.95, margin=0.01, min_rows=2, power=0.8)
LOSSY = ("lossy", 8)
NO_CHECK = {"compared": 0, "identical": 0, "near_tie": 0, "real_difference": 0, "unclassified": 0, "differing": []}


def sc(records: list[dict], baseline: list[dict], reference: list[dict] | None = None, family: tuple | None = LOSSY, **kw: object) -> dict:
    """score() with test settings; S overridden by keyword."""
    return score(records, baseline, reference if reference is not None else baseline, S.model_copy(update=kw), family, NO_CHECK)


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
    s = sc(rows(PREDS), rows(PREDS))
    assert s["fidelity"] == 1.0 and s["first_difference"] is None and s["baseline_identical"] == 1.0
    assert s["rougeL_delta"] == 0.0 and (s["rougeL_delta_low"], s["rougeL_delta_high"]) == (0.0, 0.0) and s["mlperf_99"] is True


def test_identical_predictions_get_identical_aggregate_scores() -> None:
    """The seed read 0.001 ROUGE differences as gains; identical headlines must score exactly the same."""
    import evaluate

    evaluate.load(ROUGE_MODULE)  # touching evaluate in between must not shift the bootstrap
    assert rouge(PREDS, REFS, seed=5) == rouge(PREDS, REFS, seed=5)


def test_rouge_is_the_mean_over_rows_and_matches_the_delta() -> None:
    """The ROUGE column and ΔROUGE-L come from the same per-row numbers, so they agree exactly."""
    other = ["council taxes", "storm closes schools today", "park"]
    s = sc(rows(other), rows(PREDS))
    base = sc(rows(PREDS), rows(PREDS), family=None)
    per_row = rouge(other, REFS, seed=0, per_row=True)["rougeL"]
    assert s["rougeL"] == pytest.approx(sum(per_row) / 3) and s["rougeL_low"] <= s["rougeL"] <= s["rougeL_high"]
    assert s["rougeL"] - base["rougeL"] == pytest.approx(s["rougeL_delta"])
    assert s["rougeL_delta_rows"] == 3 and s["rougeL_baseline"] == pytest.approx(base["rougeL"])
    assert s["noninferiority_margin"] == 0.01 and s["seed"] == 0 and s["bootstrap_samples"] == 500
    assert base["quality_state"] == "reference" and s["interval_level"] == pytest.approx(1 - 0.05 / 8)
    assert s["quality_state"] == decide(s["rougeL_delta_low"], s["rougeL_delta_high"], 0.01, 3, 2)[0]


def test_rows_set_aside_count_against_the_technique() -> None:
    recs = rows(PREDS)
    recs[2] = {**recs[2], "prediction": None, "skipped": "prompt too long"}
    s = sc(recs, rows(PREDS))
    per_row = rouge(PREDS, REFS, seed=0, per_row=True)["rougeL"]
    assert s["rows"] == 3 and s["samples"] == 2 and s["rows_set_aside"] == ["2"]
    assert s["rougeL"] == pytest.approx(sum(per_row[:2]) / 3)  # the set-aside row scores 0, not left out
    assert s["rougeL_delta"] == pytest.approx(-per_row[2] / 3) and s["rougeL_delta_rows"] == 3
    missing = sc(rows(PREDS)[:2], rows(PREDS))
    assert missing["rougeL_delta"] == pytest.approx(-per_row[2] / 3) and missing["rougeL_delta_rows_missing"] == ["2"]


def test_a_clear_drop_is_worse_and_a_copy_is_non_inferior() -> None:
    preds, refs = [f"council votes on budget plan {i}" for i in range(30)], [f"council votes on budget plan {i}" for i in range(30)]
    base = [{"id": str(i), "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
    bad = [{**b, "prediction": "weather"} for b in base]
    assert sc(bad, base, min_rows=30)["quality_state"] == "worse"
    same = sc(base, base, min_rows=30)
    assert same["quality_state"] == "non-inferior" and same["rows_to_decide"] is None
    few = sc(base[:12], base[:12], min_rows=30)
    assert few["quality_state"] == "too few rows" and few["rows_to_decide"] == 30


def test_score_seed_changes_intervals_not_point_estimates() -> None:
    a = sc(rows(["council taxes", "storm", "park opens"]), rows(PREDS), seed=1)
    b = sc(rows(["council taxes", "storm", "park opens"]), rows(PREDS), seed=2)
    assert a["rougeL"] == b["rougeL"] and a["rougeL_delta"] == b["rougeL_delta"]


ENV = {"cpu_id": "AuthenticAMD family 25 model 1 stepping 1", "cpu_isa": "avx2 fma"}
KEY = calibration_key("m", ENV, "cpu", "bfloat16")


def tok(i: str, ids: list[int], margins: list[float] | None = None, prediction: str = "x") -> dict:
    return {"id": i, "prediction": prediction, "reference": "r", "token_ids": ids, "margins": margins}


def test_token_check_classifies_identical_near_tie_and_real_difference() -> None:
    eps = EPS["bfloat16"]
    reference = [tok("a", [5, 6, 7], [0.5, 0.5, 0.5]), tok("b", [5, 6, 7], [0.5, 2 * eps, 0.5]), tok("c", [5, 6, 7], [0.5, 0.3, 0.5]),
                 tok("d", [5, 6], [0.5, 0.5]), tok("e", [1], None, prediction="same")]
    mine = [tok("a", [5, 6, 7]), tok("b", [5, 9, 7]), tok("c", [5, 9]), tok("d", [5, 6, 8]), {"id": "e", "prediction": "same", "reference": "r"}]
    t = token_check(mine, reference, *near_tie_threshold("bfloat16", KEY, {}, 4))
    assert (t["identical"], t["near_tie"], t["real_difference"], t["compared"]) == (2, 1, 2, 5)
    assert t["differing"] == [{"id": "b", "step": 1, "margin": 2 * eps, "class": "near_tie"},
                              {"id": "c", "step": 1, "margin": 0.3, "class": "real_difference"},
                              {"id": "d", "step": 2, "margin": None, "class": "real_difference"}]  # the reference stopped: no margin there
    assert "uncalibrated" in t["rule"] and "4 x machine epsilon of bfloat16" in t["rule"]
    # the same 2-epsilon gap is a real difference in float32, whose resolution is far finer
    assert token_check(mine, reference, *near_tie_threshold("float32", KEY, {}, 4))["near_tie"] == 0
    # a measured calibration replaces the epsilon rule for its model, device kind and dtype only
    cal = {KEY: {"threshold": 0.4, "alpha": 0.01, "check_positions": 720, "positions": 1000, "model": "m"}}
    calibrated = token_check(mine, reference, *near_tie_threshold("bfloat16", KEY, cal, 4))
    assert (calibrated["near_tie"], calibrated["real_difference"]) == (2, 1) and "probability 0.01" in calibrated["rule"]
    for other in (calibration_key("m", ENV, "cuda:0", "bfloat16"), calibration_key("m", ENV | {"cpu_isa": "avx2"}, "cpu", "bfloat16"),
                  calibration_key("gemma", ENV, "cpu", "bfloat16")):
        assert near_tie_threshold("bfloat16", other, cal, 4)[0] == pytest.approx(4 * eps)


def test_lossless_with_only_near_ties_is_equivalent_and_untested_else_a_comparison_naming_rows() -> None:
    base = [{"id": str(i), "prediction": f"headline {i}", "reference": f"headline {i}", "token_ids": [i, 1, 2], "margins": [0.5, 0.001, 0.5]}
            for i in range(4)]
    near = [{**b, "token_ids": [b["token_ids"][0], 9, 2], "prediction": f"headline {b['id']}!"} if b["id"] == "1" else b for b in base]
    check = token_check(near, base, 0.01, "rule")
    assert equivalence(check, "bfloat16", "baseline") == "equivalent to baseline up to bfloat16 numerics (3 identical + 1 near-tie)"
    s = score(near, base, base, S, LOSSY, check, "baseline", "bfloat16")
    assert s["quality_state"] == "equivalent" and "rougeL_delta_low" not in s and s["quality_reference"] == "baseline"
    real = [{**b, "token_ids": [b["token_ids"][0], 1, 7], "prediction": "other words"} if b["id"] == "2" else b for b in base]
    check = token_check(real, base, 0.01, "rule")
    assert equivalence(check, "bfloat16", "baseline") is None
    s = score(real, base, base, S, LOSSY, check, "baseline", "bfloat16")
    assert s["quality_state"] in ("non-inferior", "worse", "inconclusive") and s["interval_level"] == pytest.approx(1 - 0.05 / 8)
    assert "1 row(s) differ beyond a near-tie (2)" in s["quality_basis"] and s["rougeL_delta_vs"] == "baseline"


def test_score_technique_takes_the_reference_quality_through_near_ties_and_scores_timed_rows_on_a_real_difference(tmp_path, monkeypatch) -> None:
    """The stage's path (score_technique), bf16 on a CPU: a lossless technique whose timed rows differ from baseline's
    only at near-ties takes baseline's quality pass and is "equivalent"; one real difference makes it a comparison on
    its timed rows, and score.json says why once (quality_source_note; the state's own note stays quality_note)."""
    import yaml

    from headline_bench.files import ROOT, write_json, write_jsonl
    from headline_bench.quality.score import score_technique
    from headline_bench.settings import parse

    params = parse(yaml.safe_load((ROOT / "params.yaml").read_text()))
    monkeypatch.chdir(tmp_path)  # no calibration file here: bf16 falls back to 4 x epsilon (0.031)
    base = [{"id": str(i), "prediction": f"headline {i}", "reference": f"headline {i} today", "token_ids": [i, 1, 2, 3, 4, 5, 6, 7],
             "margins": [0.5, 0.001, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]} for i in range(4)]  # 25 shared positions: enough to judge the perturbation
    quality = base + [{**base[0], "id": str(i), "prediction": f"headline {i}", "reference": f"headline {i} today"} for i in range(4, 40)]
    write_jsonl(Path("data/generations/baseline.jsonl"), base)
    write_jsonl(Path("data/quality/baseline.jsonl"), quality)
    for name in ("baseline", "kv_cache"):
        write_json(Path(f"metrics/techniques/{name}/perf.json"), {"technique": name, "dtype": "bfloat16", "device": "cpu"})

    near = [{**b, "token_ids": [1, 9, 2, 3], "prediction": "headline 1 now"} if b["id"] == "1" else b for b in base]  # step 1: margin 0.001
    write_jsonl(Path("data/generations/kv_cache.jsonl"), near)
    s = score_technique("kv_cache", params)
    assert (s["token_check"]["identical"], s["token_check"]["near_tie"]) == (3, 1)
    assert s["quality_state"] == "equivalent" and s["quality_source"] == "reference" and s["quality_taken_from"] == "baseline"
    assert s["rows"] == 40 and "family" not in s and "3 identical + 1 near-tie" in s["quality_basis"]

    real = [{**b, "token_ids": [2, 1, 7], "prediction": "other words"} if b["id"] == "2" else b for b in base]  # step 2: margin 0.5
    write_jsonl(Path("data/generations/kv_cache.jsonl"), real)
    s = score_technique("kv_cache", params)
    assert s["token_check"]["real_difference"] == 1 and s["quality_source"] == "timed rows" and s["rows"] == 4
    assert "beyond a near-tie on 1 of 4 checked rows" in s["quality_source_note"]
    assert s["quality_state"] == "too few rows", {k: s.get(k) for k in ("rows", "rougeL_delta_low", "quality_basis", "samples")}
    assert "differ beyond a near-tie (2)" in s["quality_basis"]


def test_near_ties_need_a_perturbation_within_numeric_noise() -> None:
    """A lossy technique first differs where margins are small too; its perturbation of the margins where the tokens
    still agree (here 0.1 vs a 0.02 row cap) makes those rows real. A lossless one (0.001) keeps them near-ties; rows
    too short to judge leave them unclassified."""
    def rows_with(shift: float, length: int = 8) -> tuple[list[dict], list[dict]]:
        ref = [tok(str(i), list(range(length)), [0.3] * (length - 1) + [0.005]) for i in range(5)]
        margins = [0.3 + shift] * (length - 1) + [0.005 + shift]
        mine = [tok(str(i), list(range(length - 1)) + [99] if i == 0 else list(range(length)), margins) for i in range(5)]
        return mine, ref
    cal = {KEY: {"threshold": 0.1, "alpha": 0.01, "check_positions": 720, "positions": 1000, "model": "m", "row_cap": 0.02}}
    threshold, rule = near_tie_threshold("bfloat16", KEY, cal, 4)
    cap = perturbation_cap(threshold, row_cap(KEY, cal))
    assert cap == pytest.approx(0.02) and perturbation_cap(0.03, None) == 0.03  # uncalibrated: the threshold itself
    lossless = token_check(*rows_with(0.001), threshold, rule, cap)
    assert (lossless["near_tie"], lossless["real_difference"]) == (1, 0) and lossless["perturbation"]["within_noise"] is True
    assert lossless["perturbation"]["positions"] == 4 * 8 + 7 and "worst row" in lossless["rule"]
    lossy = token_check(*rows_with(0.1), threshold, rule, cap)
    assert (lossy["near_tie"], lossy["real_difference"]) == (0, 1) and lossy["perturbation"]["worst_q0.9"] == pytest.approx(0.1)
    assert token_check(*rows_with(0.1), threshold, rule)["near_tie"] == 1  # without a cap: the margin rule alone
    short = token_check(*rows_with(0.001, length=3), threshold, rule, cap)  # rows of 3 positions < MIN_ROW_POSITIONS
    assert (short["near_tie"], short["unclassified"]) == (0, 1) and short["perturbation"]["within_noise"] is None


def test_a_perturbation_on_few_rows_shows_on_the_worst_row() -> None:
    """2 of 30 rows perturbed (a mask bug at a cache-bucket edge), the rest exact: a pooled 0.9 quantile stays at 0 and
    would pass; the worst row does not, so the row that differs only at a small margin is a real difference."""
    ref = [tok(str(i), list(range(20)), [0.3] * 19 + [0.005]) for i in range(30)]
    mine = [tok(str(i), list(range(20)), [0.3 + (0.2 if i < 2 else 0.0)] * 20) for i in range(30)]
    mine[0] = tok("0", list(range(19)) + [99], [0.5] * 20)  # a perturbed row whose first difference sits at a tiny margin
    pooled = np.quantile([abs(a - b) for m, r in zip(mine, ref) for a, b in zip(m["margins"][:19], r["margins"][:19])], 0.9)
    assert pooled == pytest.approx(0.0, abs=1e-12)
    check = token_check(mine, ref, 0.1, "rule", 0.02)
    assert check["perturbation"]["worst_q0.9"] == pytest.approx(0.2) and check["real_difference"] == 1 and check["near_tie"] == 0
