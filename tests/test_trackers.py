"""Trackers: optimum-benchmark's sleep test for latency, and a peak-memory reset that really resets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from headline_bench.measure.trackers import Latency, LatencyTracker, MemoryTracker, TokenTimer


def test_latency_tracker_measures_sleep() -> None:
    tracker = LatencyTracker("cpu")
    for _ in range(2):
        with tracker.track():
            time.sleep(0.5)
    latency = tracker.get_latency()
    assert latency.count == 2 and 0.45 < latency.mean < 0.6


def test_latency_percentiles_and_units() -> None:
    lat = Latency.from_values(list(np.arange(1, 101, dtype=float)))
    d = lat.to_dict("latency")
    assert d["latency_s_p50"] == 50.5 and abs(d["latency_s_p99"] - 99.01) < 1e-9 and d["latency_count"] == 100
    assert d["latency_s_max"] == 100.0
    small = Latency.from_values([1.0, 2.0, 3.0, 10.0]).to_dict("latency")
    assert small["latency_s_p99"] == pytest.approx(3 + 0.97 * 7)  # linear interpolation between the two largest: not a P99
    assert small["latency_s_max"] == 10.0


def test_memory_tracker_resets_peak_between_runs() -> None:
    """A big allocation in run 1 must not show up as the peak of run 2 (the seed's bug)."""
    first = MemoryTracker("cpu")
    with first.track():
        big = torch.ones(200 * 2**20 // 4)  # 200 MB
        big += 1
    del big
    second = MemoryTracker("cpu")
    with second.track():
        small = torch.ones(10)
        small += 1
    peak1, peak2 = first.get_memory().peak_rss_mb, second.get_memory().peak_rss_mb
    assert peak1 is not None and peak2 is not None
    assert second.rss_reset, "clear_refs unavailable: peak RSS cannot be reset on this kernel"
    assert peak1 - peak2 > 150


def test_token_timer_stamps() -> None:
    timer = TokenTimer("cpu")
    timer.reset()
    scores = torch.zeros(1, 4)
    for _ in range(3):
        time.sleep(0.01)
        assert timer(torch.zeros(1, 1, dtype=torch.long), scores) is scores
    assert len(timer.seconds()) == 3
    assert timer.ttft() >= 0.01 and timer.tpot() >= 0.009


def test_token_timer_margins_by_position_and_row() -> None:
    """Relative top-2 margins per row; a later call for the same position (assisted decoding's re-verification) wins."""
    timer = TokenTimer("cpu")
    timer.reset()
    ids = torch.zeros(2, 5, dtype=torch.long)  # [B, S]: predicting position 5
    timer(ids, torch.tensor([[10.0, 8.0, 1.0], [0.2, 0.1, 0.0]]))
    timer(torch.zeros(2, 6, dtype=torch.long), torch.tensor([[4.0, 4.0, 0.0], [3.0, -1.0, 0.0]]))
    assert timer.margins(0, 5, 2) == [pytest.approx(0.2), 0.0]  # (10 - 8) / 10, then an exact tie
    assert timer.margins(1, 5, 2) == [pytest.approx(0.1), 1.0]  # |top1| < 1 divides by 1; then (3 - 0) / 3
    assert timer.margins(0, 5, 3) is None  # position 7 never seen
    timer._on_host = None
    timer(torch.zeros(2, 6, dtype=torch.long), torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert timer.margins(0, 6, 1) == [pytest.approx(0.8)]


def test_hf_generate_ttft_includes_the_prefill(tiny_llama) -> None:
    """A forward pass over the whole prompt (the prefill) that takes 0.3 s must show in TTFT, not in TPOT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headline_bench.backends.transformers import hf_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def slow_prefill(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] > 1:
            time.sleep(0.3)
    model.model.register_forward_pre_hook(slow_prefill, with_kwargs=True)
    (g,) = hf_generate(model, tok, ["a prompt of some length"], "cpu", max_new_tokens=4, min_new_tokens=4)
    assert g.ttft_s >= 0.3 and g.tpot_s < 0.3 and g.latency_s >= g.ttft_s + 3 * g.tpot_s * 0.9
    assert len(g.token_ids) == g.new_tokens == 4 and len(g.margins) == 4 and all(m >= 0 for m in g.margins)
