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


def relative_margin(logits: torch.Tensor) -> torch.Tensor:
    """(top1 - top2) / max(1, |top1|) [B] of float32 logits [B, V], computed on their device.

    Relative, so margins compare with a dtype's machine epsilon (the lossless check's near-ties)."""
    top = logits.topk(2, dim=-1).values  # [B, 2]
    return (top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1.0)


class WallClock:
    """Per-step host timestamps: on a CPU every step has finished when the host gets control back."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.t0 = 0.0
        self.stamps: list[float] = []

    def start(self) -> None:
        synchronize(self.device)
        self.t0 = time.perf_counter()
        self.stamps = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time since start()."""
        return [t - self.t0 for t in self.stamps]


class CudaEventClock(WallClock):
    """Per-step CUDA events, read after the call: no host sync inside the loop.

    A host timestamp per token needs torch.cuda.synchronize() per token, which stops the host from queueing the
    next step while the GPU runs this one (issue 19: the harness, not the technique, set the GPU numbers). Events
    are recorded on the stream in order with the work, so the elapsed time between two events is the GPU's own; the
    start is a synchronized host point with an event recorded right after it, so TTFT includes queueing.
    """

    def start(self) -> None:
        synchronize(self.device)
        self.events: list[Any] = []
        self.t0_event = torch.cuda.Event(enable_timing=True)
        self.t0_event.record()

    def mark(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def seconds(self) -> list[float]:
        """One synchronize (on the last event) per call, then the elapsed times of every event."""
        if not self.events:
            return []
        self.events[-1].synchronize()
        return [self.t0_event.elapsed_time(e) / 1e3 for e in self.events]


def step_clock(device: str) -> WallClock:
    """CUDA events on a GPU, host timestamps on a CPU."""
    return CudaEventClock(device) if device.startswith("cuda") else WallClock(device)


def ttft_tpot(seconds: list[float]) -> tuple[float | None, float | None]:
    """TTFT (start to the first token) and TPOT ((last - first) / (n - 1)) from per-token times since the start."""
    if not seconds:
        return None, None
    return seconds[0], (seconds[-1] - seconds[0]) / (len(seconds) - 1) if len(seconds) > 1 else None


def timing_gap(latency_s: float, seconds: list[float]) -> float | None:
    """|end-to-end latency - (TTFT + (n-1) x TPOT)| / latency: what the per-token clock misses of the call (set-up
    before prefill is inside TTFT; what comes after the last token is not). Issue 19 wants it within 2%."""
    if not seconds or latency_s <= 0:
        return None
    return abs(latency_s - seconds[-1]) / latency_s


TIMING_TOLERANCE = 0.02


def timing_check(gaps: list[float | None]) -> dict[str, Any]:
    """perf.json's summary of the per-call gaps: the largest, and whether every call is within TIMING_TOLERANCE."""
    known = [g for g in gaps if g is not None]
    if not known:
        return {"timing_gap_max": None, "timing_check": "n/a: no per-token times"}
    worst = max(known)
    return {"timing_gap_max": worst, "timing_check": "ok" if worst <= TIMING_TOLERANCE else
            f"TTFT + (n-1) x TPOT differs from end-to-end latency by up to {worst:.1%} (> {TIMING_TOLERANCE:.0%})"}


class TokenTimer(LogitsProcessor):
    """Records one clock mark and the top-2 logit margin per decoding step without editing `generate`
    (optimum-benchmark's trick).

    The processor runs after each forward pass, so the first mark minus the start is the time to the
    first token (prefill) and the later gaps are per-token decode times. On a GPU the marks are CUDA events
    (CudaEventClock): no host sync per token; on a CPU host timestamps. With assisted decoding several
    tokens land per step, so only end-to-end numbers are meaningful there.

    Margins are kept by the position being predicted (input_ids' length), for every row of the batch, as
    (top1 - top2) / max(1, |top1|): relative, so they compare with a dtype's machine epsilon. They stay on the
    device until margins() copies them once per call. Assisted
    decoding calls the processor once per candidate position and verifies again from the first rejected
    one, so a later call for the same position overwrites the rejected branch's value. The draft model of
    speculative decoding runs the same processors: with the target's vocabulary its positions are verified
    (and overwritten) by the target afterwards; with another vocabulary `vocab_size` leaves its logits out.
    """

    def __init__(self, device: str = "cpu", vocab_size: int | None = None) -> None:
        self.device = device
        self.vocab_size = vocab_size  # margins only from logits of this width: a draft with another vocabulary calls us too
        self.clock = step_clock(device)
        self.gaps: dict[int, torch.Tensor] = {}
        self._on_host: dict[int, list[float]] | None = None
        self._seconds: list[float] | None = None

    def reset(self) -> None:
        self.clock.start()
        self.gaps = {}
        self._on_host = None
        self._seconds = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.clock.mark()
        if self.vocab_size is not None and scores.shape[-1] != self.vocab_size:
            return scores
        self.gaps[input_ids.shape[1]] = relative_margin(scores.detach().float())  # [B]
        return scores

    def margins(self, row: int, start: int, n: int) -> list[float] | None:
        """Relative top-2 margins of one batch row for the n tokens predicted at positions start..start+n-1."""
        if not all(start + i in self.gaps for i in range(n)):
            return None
        if self._on_host is None:  # one device-to-host copy per call, not one per value
            keys = sorted(self.gaps)
            values = torch.stack([self.gaps[k] for k in keys]).tolist() if keys else []
            self._on_host = dict(zip(keys, values))
        return [float(f"{self._on_host[start + i][row]:.6g}") for i in range(n)]

    def seconds(self) -> list[float]:
        """Each token's time since reset(), read once (the clock's one sync on a GPU)."""
        if self._seconds is None:
            self._seconds = self.clock.seconds()
        return self._seconds

    def ttft(self) -> float | None:
        return ttft_tpot(self.seconds())[0]

    def tpot(self) -> float | None:
        """Mean decode time per output token after the first."""
        return ttft_tpot(self.seconds())[1]


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
