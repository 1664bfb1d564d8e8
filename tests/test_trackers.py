"""Trackers: optimum-benchmark's sleep test for latency, and a peak-memory reset that really resets."""

from __future__ import annotations

import time

import numpy as np
import torch

from trackers import Latency, LatencyTracker, MemoryTracker, TokenTimer


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
    assert len(timer.stamps) == 3
    assert timer.ttft() >= 0.01 and timer.tpot() >= 0.009
