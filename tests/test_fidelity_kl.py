"""Teacher-forced fidelity (quality/divergence.py, quality/teacher.py): KL, top-1 agreement, ΔNLL and the fidelity state."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from headline_bench.backends.llama_cpp import llamacpp_logits
from headline_bench.backends.transformers import forced_logits
from headline_bench.benchmark import guarded
from headline_bench.quality.divergence import NOT_BEYOND, combine, decide_measure, lumped_kl, reference_topk, row_measures, summarize
from headline_bench.quality.teacher import fidelity_pass, reference_pass
from headline_bench.settings import parse

PARAMS: dict[str, Any] = {
    "base": {"seed": 1, "model": "tiny", "target": "tiny", "dtype": "float32", "device": "cpu"},
    "prompt": {"template": "headline: {summary}", "few_shot": []},
    "generate": {"max_new_tokens": 6, "use_cache": True, "batch_size": 1, "warmup_runs": 1, "max_input_tokens": 600},
    "score": {"bootstrap_samples": 400, "confidence": 0.95, "min_rows": 30, "family": ["prune_l1", "llamacpp"], "seed": 3},
    "fidelity": {"rows": 40, "min_rows": 30, "top_k": 8, "bounds": {"kl_mean": 0.05, "kl_p99": 1.0, "top1": 0.9, "nll_delta": 0.05}},
    "techniques": {"baseline": {"generate": {"use_cache": False}}, "kv_cache": {"reference": "baseline"}, "same": {},
                   "prune_l1": {"prune": {"method": "l1_unstructured", "amount": 0.5, "include_lm_head": False}},
                   "llamacpp": {"engine": "llama_cpp"}},
}
WORDS = ["city", "council", "vote", "news", "river", "school", "budget", "storm", "team", "wins", "mayor", "plan"]


def baseline_records(n: int) -> list[dict[str, Any]]:
    """Quality-pass-like baseline records: a summary, a reference headline and 'greedy' token ids (bytes of a word)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 4)]
        rows.append({"id": f"r{i}", "summary": " ".join(words), "reference": " ".join(words[:2]),
                     "token_ids": [3 + (ord(c) % 90) for c in words[2][:5]]})
    return rows


@pytest.fixture()
def tiny_reference(models_dir: Path) -> tuple[Any, dict[str, Any]]:
    params = parse(copy.deepcopy(PARAMS))
    return params, reference_pass(params, baseline_records(32))


def test_identical_technique_has_zero_kl_and_full_agreement(tiny_reference: tuple[Any, dict[str, Any]]) -> None:
    """A technique that is baseline under another name: KL 0, top-1 agreement 1, ΔNLL 0 on every row, within bound."""
    params, reference = tiny_reference
    rows, result = fidelity_pass("same", params, reference)
    assert len(rows) == 32
    assert max(max(r["kl"]) for r in rows) < 1e-6
    assert all(r["top1"] == 1.0 and abs(r["nll_delta"]) < 1e-6 for r in rows)
    assert result["kl_mean"]["high"] < 1e-6 and result["top1"]["low"] == 1.0
    assert result["fidelity_state"] == "within bound"


def test_perturbed_model_has_positive_kl_with_an_interval(tiny_reference: tuple[Any, dict[str, Any]]) -> None:
    """Half the weights pruned: KL > 0 on every row, an interval over rows that excludes 0, and the state its interval
    gives against the bound (beyond a bound below the interval)."""
    params, reference = tiny_reference
    rows, result = fidelity_pass("prune_l1", params, reference)
    kl = result["kl_mean"]
    assert all(r["kl_mean"] > 0 for r in rows)
    assert 0 < kl["low"] <= kl["value"] <= kl["high"]
    assert result["kl_p99"]["low"] > 0 and result["interval_level"] == pytest.approx(1 - 0.05 / 4)  # 2 family members x 2 deciding measures
    assert result["kl_mean"]["state"] == ("beyond bound" if kl["low"] > 0.05 else "within bound" if kl["high"] <= 0.05 else "inconclusive")
    strict = parse(copy.deepcopy(PARAMS) | {"fidelity": PARAMS["fidelity"] | {"bounds": BOUNDS | {"kl_mean": kl["low"] / 2}}})
    assert fidelity_pass("prune_l1", strict, reference)[1]["fidelity_state"] == "beyond bound"


def test_lossless_baseline_and_other_model_are_not_measured(tiny_reference: tuple[Any, dict[str, Any]]) -> None:
    params, reference = tiny_reference
    assert "lossless" in fidelity_pass("kv_cache", params, reference)[1]["not_measured"]
    assert fidelity_pass("baseline", params, reference)[1]["not_measured"] == "the reference"


def test_llamacpp_without_gguf_is_na_with_the_reason(tiny_reference: tuple[Any, dict[str, Any]]) -> None:
    """llama.cpp needs the model's GGUF file; the tiny model has none: a recorded n/a skip, not a failure."""
    params, reference = tiny_reference
    rows, result = guarded("llamacpp", params, lambda: fidelity_pass("llamacpp", params, reference))
    assert rows == [] and "GGUF" in result["skipped"]


class FakeLlama:
    """llama_cpp.Llama's teacher-forcing surface: reset(), eval(ids) from position `n_tokens` on (the cache after it
    dropped), `scores` (one logits row per position); `evaluated` counts the tokens eval() was given."""

    def __init__(self, model: Any) -> None:
        self.model, self.ids, self.n_tokens, self.evaluated = model, [], 0, 0
        self.scores = np.zeros((64, model.config.vocab_size), dtype=np.float32)

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, ids: list[int]) -> None:
        self.ids = self.ids[: self.n_tokens] + list(ids)
        with torch.inference_mode():
            logits = self.model(torch.tensor([self.ids])).logits[0].numpy()
        self.scores[self.n_tokens : len(self.ids)] = logits[self.n_tokens :]
        self.n_tokens, self.evaluated = len(self.ids), self.evaluated + len(ids)


def test_llamacpp_logits_line_up_with_transformers(models_dir: Path) -> None:
    """The llama.cpp path slices its per-position logits like the transformers path: same positions, same values; the
    second sequence reuses the shared prompt's cache (only its own tokens evaluated), a different prompt starts afresh."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models_dir / "tiny").eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20, 21], [3, 6, 7, 8, 20]]
    llm = FakeLlama(model)
    hf, cpp = forced_logits(model, seqs, 4, "cpu"), llamacpp_logits(llm, seqs, 4)
    assert [t.shape[0] for t in hf] == [3, 2, 1]
    assert llm.evaluated == 7 + 2 + 5
    for a, b in zip(hf, cpp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lumped_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    base, tech = torch.randn(5, 50, generator=g) * 3, torch.randn(5, 50, generator=g) * 3
    full = (base.log_softmax(-1).exp() * (base.log_softmax(-1) - tech.log_softmax(-1))).sum(-1)
    ref = reference_topk(base, 50)
    torch.testing.assert_close(lumped_kl(ref["ids"], ref["logp"], tech)[0], full, atol=1e-5, rtol=1e-5)
    top = reference_topk(base, 5)
    kl, tail = lumped_kl(top["ids"], top["logp"], tech)
    assert (kl <= full + 1e-6).all() and (kl > 0).all() and (tail > 0).all()


def test_row_measures_top1_and_nll() -> None:
    base = torch.tensor([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0]])
    tech = torch.tensor([[5.0, 1.0, 0.0], [4.0, 0.0, 1.0]])  # second position's top token moves
    gold = torch.tensor([[0.0, 0.0, 0.0]])
    ref = reference_topk(base, 3) | {"nll": 0.5, "gold": [1]}
    m = row_measures(ref, tech, gold)
    assert m["top1"] == 0.5 and m["positions"] == 2
    assert m["nll_delta"] == pytest.approx(np.log(3) - 0.5)


@pytest.mark.parametrize(("low", "high", "worse", "state"), [
    (0.01, 0.04, "max", "within bound"), (0.06, 0.09, "max", "beyond bound"), (0.03, 0.07, "max", "inconclusive"),
    (0.92, 0.97, "min", "within bound"), (0.80, 0.88, "min", "beyond bound"), (0.85, 0.95, "min", "inconclusive")])
def test_decide_measure_three_states(low: float, high: float, worse: str, state: str) -> None:
    assert decide_measure(low, high, 0.05 if worse == "max" else 0.9, worse) == state


def test_combine_any_beyond_all_within() -> None:
    assert combine({"kl_mean": "within bound", "kl_p99": "beyond bound", "top1": "inconclusive"}) == "beyond bound"
    assert combine({"kl_mean": "within bound", "top1": "within bound"}) == "within bound"
    assert combine({"kl_mean": "within bound", "top1": "inconclusive"}) == "inconclusive"
    # the screen (kl_p99) never certifies: its "not beyond" lets kl_mean decide, and alone it decides nothing but beyond
    assert combine({"kl_mean": "within bound", "kl_p99": NOT_BEYOND}) == "within bound"
    assert combine({"kl_p99": NOT_BEYOND}) == "inconclusive"
    assert decide_measure(0.1, 0.2, 0.5, "max", screen=True) == NOT_BEYOND and decide_measure(0.6, 0.9, 0.5, "max", screen=True) == "beyond bound"


def synthetic_rows(n: int, kl: float, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        per = rng.exponential(kl, 20)
        rows.append({"kl": per.tolist(), "kl_mean": float(per.mean()), "top1": float(rng.uniform(0.95, 1.0)),
                     "nll_delta": float(rng.normal(0.005, 0.01)), "tail_mass": 0.0, "positions": 20})
    return rows


BOUNDS = {"kl_mean": 0.05, "kl_p99": 1.0, "top1": 0.9, "nll_delta": 0.05}
DECIDE = ["kl_mean", "kl_p99"]


def test_summarize_states_and_too_few_rows() -> None:
    assert summarize(synthetic_rows(100, 0.005), BOUNDS, 0.99, 500, 1, 30, DECIDE)["fidelity_state"] == "within bound"
    beyond = summarize(synthetic_rows(100, 0.2), BOUNDS, 0.99, 500, 1, 30, DECIDE)
    assert beyond["fidelity_state"] == "beyond bound" and beyond["kl_mean"]["low"] > 0.05
    assert summarize(synthetic_rows(40, 0.05, seed=1), BOUNDS, 0.99, 500, 1, 30, DECIDE)["kl_mean"]["state"] == "inconclusive"
    assert summarize(synthetic_rows(10, 0.005), BOUNDS, 0.99, 500, 1, 30, DECIDE)["fidelity_state"] == "too few rows"


def test_only_the_deciding_measures_make_the_state() -> None:
    """Top-1 agreement below its bound (near-ties among flat candidates) is shown as beyond, but with fidelity.decide =
    [kl_mean, kl_p99] the technique's state follows the KL measures; deciding on top-1 too makes it beyond."""
    rows = [r | {"top1": 0.6} for r in synthetic_rows(100, 0.005)]
    out = summarize(rows, BOUNDS, 0.99, 500, 1, 30, DECIDE)
    assert out["top1"]["state"] == "beyond bound" and out["fidelity_state"] == "within bound" and out["decided_by"] == DECIDE
    assert summarize(rows, BOUNDS, 0.99, 500, 1, 30, [*DECIDE, "top1"])["fidelity_state"] == "beyond bound"


def test_pooled_quantiles_equal_numpy_on_the_concatenated_resamples() -> None:
    import numpy as np

    from headline_bench.quality.divergence import pooled_quantiles

    rng = np.random.default_rng(0)
    values = [rng.exponential(1.0, rng.integers(1, 25)).round(2) for _ in range(13)]  # ties across rows, a 1-position row
    picks = rng.integers(0, len(values), (700, len(values)))
    want = [np.quantile(np.concatenate([values[i] for i in p]), q) for q in (0.99,) for p in picks]
    assert np.allclose(pooled_quantiles(values, 0.99, picks, chunk=64), want, rtol=0, atol=1e-12)
    assert np.allclose(pooled_quantiles(values, 0.5, picks[:50]), [np.quantile(np.concatenate([values[i] for i in p]), 0.5) for p in picks[:50]])
