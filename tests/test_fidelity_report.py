"""The report's fidelity section: both states side by side, and which one decided, from fidelity.json as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report import REPORT, SCORE, fake_metrics

from headline_bench.quality.divergence import summarize
from headline_bench.render import report
from headline_bench.render.fidelity import decided_by
from headline_bench.settings import Report, Score

BOUNDS = {"kl_mean": 0.05, "kl_p99": 1.0, "top1": 0.9, "nll_delta": 0.05}


def fidelity_json(name: str, kl: float) -> dict[str, Any]:
    """fidelity.json of a technique whose per-token KL is exponential with mean `kl` (summarize() itself decides)."""
    rng = np.random.default_rng(1)
    rows = [{"kl": (per := rng.exponential(kl, 20)).tolist(), "kl_mean": float(per.mean()), "top1": 0.97, "nll_delta": 0.01, "tail_mass": 0.001}
            for _ in range(100)]
    return {"technique": name, "reference": "baseline"} | summarize(rows, BOUNDS, 0.99, 300, 1, 30, ["kl_mean", "kl_p99"])


def test_report_shows_both_states_and_says_which_decided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names, perfs, scores, prepare, gens = fake_metrics()
    fids = {"quant8": fidelity_json("quant8", 0.004), "prune_l1": fidelity_json("prune_l1", 0.3),
            "kv_cache": {"technique": "kv_cache", "not_measured": "lossless (reference baseline): judged by the token-id check"}}
    summary = report.report(names, perfs, scores, prepare, gens, "kv_cache", Report(**REPORT), Score(**SCORE), fids)
    text = (tmp_path / "metrics" / "report.md").read_text()
    section = text.split("## Fidelity to baseline")[1].split("## Latency")[0]
    quant8 = next(line for line in section.splitlines() if line.startswith("| quant8 "))
    assert "**within bound**" in quant8 and decided_by(scores["quant8"]["quality_state"], "within bound") in quant8
    assert "**beyond bound**" in next(line for line in section.splitlines() if line.startswith("| prune_l1 "))
    assert "Not measured: kv_cache (lossless" in section
    assert summary["techniques"]["quant8"]["fidelity_state"] == "within bound"


@pytest.mark.parametrize(("rouge", "fidelity", "said"), [
    ("inconclusive", "within bound", "fidelity (ROUGE inconclusive)"), ("worse", "beyond bound", "both"),
    ("non-inferior", "inconclusive", "ROUGE (fidelity inconclusive)"), ("inconclusive", "inconclusive", "neither"),
    ("non-inferior", None, "ROUGE (fidelity n/a)")])
def test_decided_by(rouge: str, fidelity: str | None, said: str) -> None:
    assert decided_by(rouge, fidelity) == said


def test_fidelity_record_reads_the_family_and_gives_the_rest_their_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fidelity stage (pipelines/fidelity/dvc.yaml) runs for score.family only: a member's file is read (a missing one says so); every other
    technique gets its n/a from params, even where an older run left a fidelity.json behind."""
    from headline_bench.files import TECHNIQUE_METRICS, write_json
    from headline_bench.settings import load_params

    params = load_params()  # the committed params.yaml, read before leaving the repository
    monkeypatch.chdir(tmp_path)
    write_json(TECHNIQUE_METRICS / "quant8" / "fidelity.json", written := fidelity_json("quant8", 0.004))
    write_json(TECHNIQUE_METRICS / "kv_cache" / "fidelity.json", {"technique": "kv_cache", "fidelity_state": "stale"})
    assert report.fidelity_record("quant8", params) == written
    assert "missing" in report.fidelity_record("quant4", params)["skipped"]
    assert report.fidelity_record("kv_cache", params)["not_measured"].startswith("lossless (reference baseline)")
    assert report.fidelity_record("target_only", params)["not_measured"].startswith("n/a: another model")
    assert report.fidelity_record("baseline", params)["not_measured"] == "the reference"
