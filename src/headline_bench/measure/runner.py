"""The timed runner: warm-up, timed passes over every prompt, per-pass numbers and their spread."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from headline_bench.backends.base import GenerateFn, Generation
from headline_bench.measure.trackers import EnergyTracker, Latency, MemoryTracker


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def dynamo_graphs() -> int:
    """Graphs torch.compile has built so far in this process (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run(generate_fn: GenerateFn, prompts: list[str], batch_size: int, warmup_runs: int, device: str,
        after_warmup: Callable[[], None] = lambda: None, done: list[Generation] | None = None,
        on_batch: Callable[[list[Generation]], None] | None = None) -> tuple[list[Generation], dict[str, Any]]:
    """Warm up, then generate every prompt once, timing each batch; return generations and perf numbers.

    Args:
        generate_fn: a backend bound to its model and generate kwargs.
        prompts: all prompts, in row order.
        batch_size: prompts per call.
        warmup_runs: untimed calls on the first batch (compile, allocator and cache warm-up).
        device: "cpu" or "cuda", for the memory tracker.
        after_warmup: called once the warm-up calls are done (resets counters that must cover timed rows only).
        done: generations of the first rows, finished in an earlier session (checkpoint.py); the rest run now.
        on_batch: called with each finished batch (the checkpoint's append).
    """
    done = done or []
    groups = batches(prompts[len(done) :], batch_size)
    warmup_s = []
    for _ in range(warmup_runs if groups else 0):
        start = time.perf_counter()
        generate_fn(groups[0])
        warmup_s.append(time.perf_counter() - start)
    after_warmup()
    memory, energy = MemoryTracker(device), EnergyTracker(device)
    gens: list[Generation] = list(done)
    graphs = dynamo_graphs()
    wall = time.perf_counter()
    with memory.track(), energy.track():
        for group in tqdm(groups, desc="generate", unit="batch", mininterval=2):
            gens.extend(out := generate_fn(group))
            if on_batch:
                on_batch(out)
    wall = time.perf_counter() - wall
    per_call = [g.latency_s for g in gens[::batch_size]]  # every row of a batch carries the batch's latency
    new_tokens = sum(g.new_tokens for g in gens)
    busy = sum(per_call)
    perf = {
        **Latency.from_values([g.latency_s for g in gens]).to_dict("latency"),
        **Latency.from_values([g.ttft_s for g in gens if g.ttft_s is not None]).to_dict("ttft"),
        **Latency.from_values([g.tpot_s for g in gens if g.tpot_s is not None]).to_dict("tpot"),
        "samples_per_s": len(gens) / busy,
        "tokens_per_s": new_tokens / busy,
        "new_tokens_mean": new_tokens / len(gens),
        "wall_s": wall,
        "warmup_s": warmup_s,
        "graphs_compiled_before_timing": graphs,
        "recompiles_in_timed_run": dynamo_graphs() - graphs,  # > 0: shapes changed and the timed run paid for compiling
        **energy_numbers(energy.joules, energy.reason, gens[len(done) :]),
        **{k: v for k, v in asdict(memory.get_memory()).items() if v is not None and k != "unit"},
        "rss_reset": memory.rss_reset,  # False: VmHWM could not be reset, so peak_rss_mb may be an earlier peak
    }
    return gens, perf


def energy_numbers(joules: float | None, source: str, ran: list[Generation]) -> dict[str, Any]:
    """Energy per headline and per token over the rows this session generated: the energy counter ran only while they
    did, so rows resumed from an earlier session (whose energy is not known here) are not in the denominators."""
    tokens = sum(g.new_tokens for g in ran)
    return {"energy_j": joules, "energy_source": source,
            "energy_j_per_headline": joules / len(ran) if joules is not None and ran else None,
            "energy_j_per_token": joules / tokens if joules is not None and tokens else None,
            "energy_scope": f"this session's {len(ran)} rows and {tokens} new tokens"}


def spread(values: list[float]) -> float | None:
    """Run-to-run spread of per-pass numbers: (max - min) / mean; None with fewer than two passes."""
    return (max(values) - min(values)) / (sum(values) / len(values)) if len(values) > 1 and sum(values) else None


def run_repeats(generate_fn: GenerateFn, prompts: list[str], batch_size: int, warmup_runs: int, device: str, repeats: int,
                after_warmup: Callable[[], None] = lambda: None, done: list[Generation] | None = None,
                on_batch: Callable[[list[Generation]], None] | None = None) -> tuple[list[Generation], dict[str, Any]]:
    """`repeats` timed passes over all prompts in this process (warm-up before the first only).

    The first pass's generations are kept (greedy passes give the same text); each row's latency becomes
    its mean over the passes (every pass's value kept in latency_s_passes), and the latency percentiles
    cover every row of every pass. perf.json gets each pass's numbers and their run-to-run spread. Only the first
    pass resumes from `done` and feeds the checkpoint (`on_batch`); later passes time every row again.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # the order techniques ran in, across processes
    passes = [run(generate_fn, prompts, batch_size, warmup_runs, device, after_warmup, done, on_batch)]
    passes += [run(generate_fn, prompts, batch_size, 0, device) for _ in range(repeats - 1)]
    gens, perf = passes[0]
    if repeats == 1:
        return gens, perf | {"repeats": 1, "started_at": started, "passes": [pass_numbers(perf)]}
    every = [g for pass_gens, _ in passes for g in pass_gens]
    for i, g in enumerate(gens):
        g.latency_s_passes = [pass_gens[i].latency_s for pass_gens, _ in passes]
        g.latency_s = sum(g.latency_s_passes) / repeats
        times = [(p[i].ttft_s, p[i].tpot_s) for p, _ in passes]
        g.ttft_s = sum(t for t, _ in times) / repeats if all(t is not None for t, _ in times) else None
        g.tpot_s = sum(t for _, t in times) / repeats if all(t is not None for _, t in times) else None
    busy = sum(len(p_gens) / p["samples_per_s"] for p_gens, p in passes)
    merged = {
        **Latency.from_values([g.latency_s for g in every]).to_dict("latency"),
        **Latency.from_values([g.ttft_s for g in every if g.ttft_s is not None]).to_dict("ttft"),
        **Latency.from_values([g.tpot_s for g in every if g.tpot_s is not None]).to_dict("tpot"),
        "samples_per_s": len(every) / busy,
        "tokens_per_s": sum(g.new_tokens for g in every) / busy,
        "wall_s": sum(p["wall_s"] for _, p in passes),
        "rss_reset": all(p["rss_reset"] for _, p in passes),
    }
    for key in ("peak_rss_mb", "max_allocated_mb", "max_reserved_mb"):
        if key in perf:
            merged[key] = max(p[key] for _, p in passes)
    numbers = [pass_numbers(p) for _, p in passes]
    return gens, perf | merged | {
        "repeats": repeats, "started_at": started, "passes": numbers,
        "tokens_per_s_spread": spread([n["tokens_per_s"] for n in numbers]),
        "latency_s_mean_spread": spread([n["latency_s_mean"] for n in numbers]),
    }


def pass_numbers(perf: dict[str, Any]) -> dict[str, Any]:
    """One timed pass's headline numbers, for the run-to-run spread."""
    keys = ("latency_s_mean", "latency_s_p50", "latency_s_max", "tokens_per_s", "samples_per_s", "wall_s")
    return {k: perf[k] for k in keys if k in perf}
