"""perf.json and score.json have one definition each: committed files fit it, a key set twice or undeclared is an
error, the report's row keys come from it, and energy is divided by the rows of the session that measured it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydantic import ValidationError

from conftest import ROOT
from headline_bench.analysis.rows import PERF_KEYS, SCORE_KEYS
from headline_bench.backends.base import Generation
from headline_bench.measure import runner
from headline_bench.measure.records import Perf, assemble, join
from headline_bench.quality.records import Score


@pytest.mark.parametrize(("kind", "record"), [("perf", Perf), ("score", Score)])
def test_committed_records_fit_their_definition_unchanged(kind: str, record: type) -> None:
    """Every committed perf.json / score.json validates and comes back with the same keys and values (dvc metrics diff)."""
    paths = sorted((ROOT / "metrics").rglob(f"{kind}.json"))
    assert len(paths) >= 15
    for path in paths:
        data = json.loads(path.read_text())
        assert json.dumps(assemble(record, data)) == json.dumps(data), path


def test_a_key_set_twice_or_undeclared_is_an_error() -> None:
    with pytest.raises(ValueError, match="set twice: weight_mb"):
        assemble(Perf, {"technique": "t", "weight_mb": 1.0}, {"weight_mb": 2.0})
    with pytest.raises(ValidationError, match="weight_mbs"):
        assemble(Perf, {"technique": "t", "weight_mbs": 1.0})
    with pytest.raises(ValidationError, match="samples"):
        assemble(Perf, {"technique": "t", "samples": "twelve"})
    with pytest.raises(ValueError, match="set twice: fidelity"):
        join({"fidelity": 1.0}, {"fidelity": 0.5})
    assert list(assemble(Score, {"technique": "t"}, {"rougeL": 0.3, "rouge1": 0.4})) == ["technique", "rougeL", "rouge1"]  # order kept


def test_row_keys_come_from_the_definitions() -> None:
    assert {"latency_s_p50", "tokens_per_s", "energy_j_per_headline", "energy_scope", "weight_mb"} <= set(PERF_KEYS)
    assert "passes" not in PERF_KEYS and "env" not in PERF_KEYS
    assert {"rougeL", "rougeL_delta_low", "token_check", "fidelity"} <= set(SCORE_KEYS) and "seed" not in SCORE_KEYS
    assert set(PERF_KEYS) <= set(Perf.model_fields) and set(SCORE_KEYS) <= set(Score.model_fields)


def test_energy_is_divided_by_this_sessions_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows resumed from an earlier session, two run now: the 12 J measured now cover the two new rows only."""

    class FakeEnergy:
        def __init__(self, device: str) -> None:
            self.joules, self.reason = None, "fake counter"

        @contextmanager
        def track(self) -> Iterator[None]:
            yield
            self.joules = 12.0

    def gen(tokens: int) -> Generation:
        return Generation("h", "h", 5, tokens, 0.1, 0.01, 0.01)

    monkeypatch.setattr(runner, "EnergyTracker", FakeEnergy)
    done = [gen(100), gen(100)]
    gens, perf = runner.run(lambda prompts: [gen(3) for _ in prompts], ["a", "b", "c", "d"], 1, 0, "cpu", done=done)
    assert len(gens) == 4 and perf["energy_j"] == 12.0
    assert perf["energy_j_per_headline"] == 6.0 and perf["energy_j_per_token"] == 2.0
    assert perf["energy_scope"] == "this session's 2 rows and 6 new tokens"



def test_warmup_calls_cycle_over_the_first_batches_and_stay_untimed() -> None:
    """A compiled generate() recompiles for dynamic shapes at its second prompt length: warm-up calls on the first two
    batches (warmup_batches=2) put that compile before the timed rows; the default keeps every call on the first batch."""
    calls: list[list[str]] = []

    def fake(prompts: list[str]) -> list[Generation]:
        calls.append(list(prompts))
        return [Generation("h", "h", 5, 3, 0.1, 0.01, 0.01) for _ in prompts]

    gens, perf = runner.run(fake, ["a", "b", "c"], 1, 2, "cpu", warmup_batches=2)
    assert calls == [["a"], ["b"], ["a"], ["b"], ["c"]] and len(gens) == 3 and len(perf["warmup_s"]) == 2
    calls.clear()
    runner.run(fake, ["a", "b", "c"], 1, 2, "cpu")
    assert calls[:2] == [["a"], ["a"]]
