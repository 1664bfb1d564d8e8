"""Measurement only: latency, per-token timestamps and peak memory (after optimum-benchmark's trackers).

The generate loop wraps its calls in these; nothing here knows about techniques."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that a host timer measures it (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Latency:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    stdev: float
    max: float
    unit: str = "s"

    @staticmethod
    def from_values(values: list[float]) -> Latency:
        a = np.asarray(values, dtype=float)
        if a.size == 0:
            return Latency(0, *[float("nan")] * 6)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])  # numpy's default estimator: linear interpolation
        return Latency(int(a.size), float(a.mean()), float(p50), float(p90), float(p99), float(a.std()), float(a.max()))

    def to_dict(self, prefix: str) -> dict[str, float]:
        d = asdict(self)
        unit = d.pop("unit")
        count = d.pop("count")
        return {f"{prefix}_{unit}_{k}": v for k, v in d.items()} | {f"{prefix}_count": count}


class LatencyTracker:
    """Times each `track()` block with perf_counter, synchronizing the device on both sides."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.values: list[float] = []

    @contextmanager
    def track(self) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.values.append(time.perf_counter() - start)

    def get_latency(self) -> Latency:
        return Latency.from_values(self.values)


@dataclass
class Memory:
    peak_rss_mb: float | None = None
    max_allocated_mb: float | None = None
    max_reserved_mb: float | None = None
    unit: str = "MB"


def _rss_hwm_mb() -> float | None:
    """The process's peak resident set size (VmHWM) in MB, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS ('5' to clear_refs, Linux >= 4.0) so each run gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryTracker:
    """Peak memory of the `track()` blocks: CUDA allocator peaks on GPU, peak RSS of the process on CPU.

    Peaks are reset when a block starts, so a run never inherits an earlier run's peak (the seed's
    10,868 MB on every row came from never resetting). Across several blocks the maximum is kept. On a model
    split over several GPUs (device_map) the peaks are summed over every visible device, not cuda:0 alone.
    `rss_reset` says whether the kernel accepted the RSS reset (else the RSS peak covers the whole process).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.memory = Memory()
        self.rss_reset = True

    @contextmanager
    def track(self) -> Iterator[None]:
        cuda = self.device.startswith("cuda")
        devices = range(torch.cuda.device_count()) if cuda else range(0)
        for d in devices:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        self.rss_reset = reset_peak_rss() and self.rss_reset
        yield
        if cuda:
            for d in devices:
                torch.cuda.synchronize(d)
            alloc = sum(torch.cuda.max_memory_allocated(d) for d in devices) / 2**20
            reserved = sum(torch.cuda.max_memory_reserved(d) for d in devices) / 2**20
            self.memory.max_allocated_mb = max(self.memory.max_allocated_mb or 0.0, alloc)
            self.memory.max_reserved_mb = max(self.memory.max_reserved_mb or 0.0, reserved)
        rss = _rss_hwm_mb()
        if rss is not None:
            self.memory.peak_rss_mb = max(self.memory.peak_rss_mb or 0.0, rss)

    def get_memory(self) -> Memory:
        return self.memory


def nvml_handles() -> list[Any]:
    """NVML handles of the GPUs this process sees, matched by PCI bus id (CUDA and NVML may number GPUs differently),
    or by index when the ids do not resolve and the counts agree; [] without NVML."""
    if not torch.cuda.is_available():
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, or no driver library
        return []
    handles = []
    for d in range(torch.cuda.device_count()):
        try:
            handles.append(pynvml.nvmlDeviceGetHandleByPciBusId(_pci_bus_id(d)))
        except Exception:
            break
    else:
        return handles
    if "CUDA_VISIBLE_DEVICES" not in os.environ and pynvml.nvmlDeviceGetCount() == torch.cuda.device_count():
        return [pynvml.nvmlDeviceGetHandleByIndex(d) for d in range(torch.cuda.device_count())]
    return []


def _pci_bus_id(device: int) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


class EnergyTracker:
    """GPU energy of the `track()` blocks from NVML's total-energy counter (mJ, Volta and later), summed over GPUs.

    Where NVML or the counter is missing (every CPU run) `joules` stays None and `reason` says why: a number
    this harness cannot measure is n/a, never a guess.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.joules: float | None = None
        self.reason = "n/a: CPU run (NVML measures GPUs only)"
        self.handles = nvml_handles() if device.startswith("cuda") else []
        if device.startswith("cuda") and not self.handles:
            self.reason = "n/a: NVML not available (pip install nvidia-ml-py)"

    def _read(self) -> float | None:
        import pynvml

        try:
            return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000.0
        except pynvml.NVMLError as e:
            self.reason = f"n/a: NVML energy counter unsupported ({e})"
            return None

    @contextmanager
    def track(self) -> Iterator[None]:
        start = self._read() if self.handles else None
        yield
        if start is not None:
            torch.cuda.synchronize()
            end = self._read()
            if end is not None:
                self.joules = (self.joules or 0.0) + end - start
                self.reason = "NVML total energy counter, all visible GPUs"


def device_used_mb() -> float | None:
    """Memory in use on the visible GPUs as the driver sees it (NVML), every process included: the only honest
    reading for an engine that runs in another process (vLLM), and a device-wide one."""
    handles = nvml_handles()
    if not handles:
        return None
    import pynvml

    return sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**20


class TokenTimer(LogitsProcessor):
    """Records one timestamp and the top-2 logit margin per decoding step without editing `generate`
    (optimum-benchmark's trick).

    The processor runs after each forward pass, so the first stamp minus the start is the time to the
    first token (prefill) and the later gaps are per-token decode times. With assisted decoding several
    tokens land per step, so only end-to-end numbers are meaningful there.

    Margins are kept by the position being predicted (input_ids' length), for every row of the batch, as
    (top1 - top2) / max(1, |top1|): relative, so they compare with a dtype's machine epsilon. Assisted
    decoding calls the processor once per candidate position and verifies again from the first rejected
    one, so a later call for the same position overwrites the rejected branch's value. The draft model of
    speculative decoding runs the same processors: with the target's vocabulary its positions are verified
    (and overwritten) by the target afterwards; with another vocabulary `vocab_size` leaves its logits out.
    """

    def __init__(self, device: str = "cpu", vocab_size: int | None = None) -> None:
        self.device = device
        self.vocab_size = vocab_size  # margins only from logits of this width: a draft with another vocabulary calls us too
        self.start = 0.0
        self.stamps: list[float] = []
        self.gaps: dict[int, torch.Tensor] = {}
        self._on_host: dict[int, list[float]] | None = None

    def reset(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()
        self.stamps = []
        self.gaps = {}
        self._on_host = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.vocab_size is not None and scores.shape[-1] != self.vocab_size:
            return scores
        top = scores.detach().float().topk(2, dim=-1).values  # [B, 2]
        self.gaps[input_ids.shape[1]] = (top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1.0)  # [B]
        return scores

    def margins(self, row: int, start: int, n: int) -> list[float] | None:
        """Relative top-2 margins of one batch row for the n tokens predicted at positions start..start+n-1."""
        if not all(start + i in self.gaps for i in range(n)):
            return None
        if self._on_host is None:  # one device-to-host copy per call, not one per value
            self._on_host = {k: v.tolist() for k, v in self.gaps.items()}
        return [float(f"{self._on_host[start + i][row]:.6g}") for i in range(n)]

    def ttft(self) -> float | None:
        return self.stamps[0] - self.start if self.stamps else None

    def tpot(self) -> float | None:
        """Mean decode time per output token after the first."""
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


class AcceptanceTracker:
    """Counts draft tokens proposed and accepted in assisted generation (speculative, prompt lookup).

    It wraps the candidate generator that `generate` builds for each call (a private hook of transformers,
    `_get_candidate_generator`); where that hook is missing, the rate is None rather than a guess.
    """

    def __init__(self) -> None:
        self.proposed = 0
        self.accepted = 0
        self.attached = False

    def reset(self) -> None:
        """Forget what was counted so far (the warm-up calls), so the rate covers the timed rows only."""
        self.proposed = self.accepted = 0

    def attach(self, model: Any) -> None:
        build = getattr(model, "_get_candidate_generator", None)
        if build is None:
            return
        tracker = self

        def counting_build(*args: Any, **kwargs: Any) -> Any:
            generator = build(*args, **kwargs)
            get, update = generator.get_candidates, generator.update_candidate_strategy

            def get_candidates(input_ids: torch.LongTensor, *a: Any, **kw: Any) -> Any:
                candidates, logits = get(input_ids, *a, **kw)
                tracker.proposed += candidates.shape[1] - input_ids.shape[1]
                return candidates, logits

            def update_candidate_strategy(input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> Any:
                tracker.accepted += int(num_matches)
                return update(input_ids, scores, num_matches)

            generator.get_candidates, generator.update_candidate_strategy = get_candidates, update_candidate_strategy
            return generator

        model._get_candidate_generator = counting_build
        self.attached = True

    def rate(self) -> float | None:
        return self.accepted / self.proposed if self.attached and self.proposed else None
