"""The timed runner: warm-up, timed passes over every prompt, per-pass numbers and their spread."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
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


def cudagraph_skips() -> int:
    """Compiled graphs that inductor ran without CUDA graphs so far in this process (a mutated input, a CPU op, ...):
    each one launches its kernels one by one from Python, the overhead reduce-overhead exists to remove."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def run(generate_fn: GenerateFn, prompts: list[str], batch_size: int, warmup_runs: int, device: str,
        after_warmup: Callable[[], None] = lambda: None, done: list[Generation] | None = None,
        on_batch: Callable[[list[Generation]], None] | None = None, warmup_batches: int = 1) -> tuple[list[Generation], dict[str, Any]]:
    """Warm up, then generate every prompt once, timing each batch; return generations and perf numbers.

    Args:
        generate_fn: a backend bound to its model and generate kwargs.
        prompts: all prompts, in row order.
        batch_size: prompts per call.
        warmup_runs: untimed calls (compile, allocator and cache warm-up), on the first `warmup_batches` batches in
            turn (2: a second call on a second batch also compiles the dynamic-shape graph a compiled generate()
            switches to at the second prompt length).
        device: "cpu" or "cuda", for the memory tracker.
        after_warmup: called once the warm-up calls are done (resets counters that must cover timed rows only).
        done: generations of the first rows, finished in an earlier session (checkpoint.py); the rest run now.
        on_batch: called with each finished batch (the checkpoint's append).
    """
    done = done or []
    groups = batches(prompts[len(done) :], batch_size)
    warmup_s = []
    for k in range(warmup_runs if groups else 0):
        start = time.perf_counter()
        generate_fn(groups[k % min(warmup_batches, len(groups))])
        warmup_s.append(time.perf_counter() - start)
    after_warmup()
    memory, energy = MemoryTracker(device), EnergyTracker(device)
    gens: list[Generation] = list(done)
    graphs, skips = dynamo_graphs(), cudagraph_skips()
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
        "cudagraph_skips_in_timed_run": cudagraph_skips() - skips,  # > 0: a compiled step ran without its CUDA graph
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
                on_batch: Callable[[list[Generation]], None] | None = None, warmup_batches: int = 1) -> tuple[list[Generation], dict[str, Any]]:
    """`repeats` timed passes over all prompts in this process (warm-up before the first only), merged by merge_runs.

    Only the first pass resumes from `done` and feeds the checkpoint (`on_batch`); later passes time every row again.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # the order techniques ran in, across processes
    passes = [run(generate_fn, prompts, batch_size, warmup_runs, device, after_warmup, done, on_batch, warmup_batches)]
    passes += [run(generate_fn, prompts, batch_size, 0, device) for _ in range(repeats - 1)]
    gens, perf = merge_runs(passes, "passes")
    return gens, perf | {"repeats": repeats, "started_at": started}


def merge_runs(runs: list[tuple[list[Generation], dict[str, Any]]], label: str) -> tuple[list[Generation], dict[str, Any]]:
    """Timed runs over the same prompts, merged: passes in one process (`label` "passes") or processes ("processes").

    The first run's generations are kept (greedy runs give the same text); with more than one run each row's
    latency becomes its mean over the runs (every run's value kept in `latency_s_<label>`), and the latency
    percentiles cover every row of every run. perf gets each run's numbers (`<label>`) and their run-to-run spread.
    """
    first, perf = runs[0]
    numbers = [pass_numbers(p) for _, p in runs]
    if len(runs) == 1:
        return first, perf | {label: numbers}
    every = [g for run_gens, _ in runs for g in run_gens]
    busy = sum(len(r_gens) / p["samples_per_s"] for r_gens, p in runs)
    # pooled from each run's own values, before the merged rows exist (they are copies: no run's values are overwritten)
    merged = {
        **Latency.from_values([g.latency_s for g in every]).to_dict("latency"),
        **Latency.from_values([g.ttft_s for g in every if g.ttft_s is not None]).to_dict("ttft"),
        **Latency.from_values([g.tpot_s for g in every if g.tpot_s is not None]).to_dict("tpot"),
        "samples_per_s": len(every) / busy,
        "tokens_per_s": sum(g.new_tokens for g in every) / busy,
        "wall_s": sum(p["wall_s"] for _, p in runs),
        "rss_reset": all(p["rss_reset"] for _, p in runs),
    }
    gens = []
    for i, g in enumerate(first):
        values = [run_gens[i].latency_s for run_gens, _ in runs]
        times = [(r[i].ttft_s, r[i].tpot_s) for r, _ in runs]
        gens.append(replace(g, **{f"latency_s_{label}": values}, latency_s=sum(values) / len(runs),
                            ttft_s=sum(t for t, _ in times) / len(runs) if all(t is not None for t, _ in times) else None,
                            tpot_s=sum(t for _, t in times) / len(runs) if all(t is not None for _, t in times) else None))
    for key in ("peak_rss_mb", "max_allocated_mb", "max_reserved_mb"):
        if key in perf:
            merged[key] = max(p[key] for _, p in runs)
    return gens, perf | merged | {
        label: numbers,
        "tokens_per_s_spread": spread([n["tokens_per_s"] for n in numbers]),
        "latency_s_mean_spread": spread([n["latency_s_mean"] for n in numbers]),
    }


# perf.json numbers that belong to one timed process (kept per process in `processes`, not merged)
PROCESS_KEYS = ("process", "pid", "started_at", "finished_at", "warmup_s", "compile_s", "load_s", "repeats", "passes", "resume",
                "recompiles_in_timed_run", "acceptance_rate", "rss_reset", "peak_rss_mb", "max_allocated_mb", "max_reserved_mb", "wall_s",
                "latency_s_mean", "latency_s_p50", "latency_s_max", "tokens_per_s", "samples_per_s", "tokens_per_s_spread", "latency_s_mean_spread",
                "tpot_s_p50", "tpot_s_mean", "timing_lock", "timing_lock_wait_s")


def merge_processes(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A technique's timed processes (each {"records", "perf"} from one `generate.py <technique> --process k`), merged.

    The records are process 1's (its predictions), each timed row with its latency in every process
    (`latency_s_processes`) and their mean (`latency_s`); the top-level numbers cover every row of every process
    (merge_runs). perf.json keeps each process's pid, start time, per-row latencies (`latency_s`, in `row_ids`
    order) and own numbers under `processes`, and the rows whose token ids differ between processes (greedy
    decoding in a fresh process should repeat itself exactly; a differing row is reported, never hidden).
    """
    names = {f.name for f in fields(Generation)}
    runs = [([Generation(**{k: r[k] for k in names if k in r}) for r in res["records"] if "latency_s" in r], res["perf"]) for res in results]
    first = results[0]["records"]
    timed = [r for r in first if "latency_s" in r]
    ids = [r["id"] for r in timed]
    processes = [{**{k: p[k] for k in PROCESS_KEYS if k in p}, "latency_s": [g.latency_s for g in gens],
                  **({"latency_s_passes": [g.latency_s_passes for g in gens]} if (p.get("repeats") or 1) > 1 else {})} for gens, p in runs]
    differ = sorted({i for gens, _ in runs[1:] for i, g, h in zip(ids, runs[0][0], gens) if g.token_ids != h.token_ids})
    if any(len(gens) != len(runs[0][0]) for gens, _ in runs):
        raise RuntimeError(f"timed processes generated different numbers of rows: {[len(gens) for gens, _ in runs]}")
    gens, perf = merge_runs(runs, "processes")
    records = [{**{k: v for k, v in row.items() if k not in names}, **asdict(g)} for row, g in zip(timed, gens)]
    perf = {k: v for k, v in perf.items() if k not in ("passes", "process", "pid", "finished_at", "timing_lock")}
    waits = [p["timing_lock_wait_s"] for _, p in runs if p.get("timing_lock_wait_s") is not None]
    return records + [r for r in first if "latency_s" not in r], perf | {
        **({"timing_lock_wait_s": sum(waits)} if waits else {}), "processes": processes, "process_count": len(processes), "row_ids": ids, "token_ids_differ_across_processes": differ}


def pass_numbers(perf: dict[str, Any]) -> dict[str, Any]:
    """One timed pass's headline numbers, for the run-to-run spread."""
    keys = ("latency_s_mean", "latency_s_p50", "latency_s_max", "tokens_per_s", "samples_per_s", "wall_s")
    return {k: perf[k] for k in keys if k in perf}
