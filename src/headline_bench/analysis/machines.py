"""Techniques x machines: each run's perf.json and score.json as one cell per technique and machine (compare.py reads
the runs, render/machines.py draws the table).

A column is one machine of one source, named by its environment fingerprint. Each cell: median and mean TPOT (ms) and
tokens/s with 95% intervals, the ratio of its time per token to the same column's references (ratios never mix
machines), peak memory and the quality state of score.json. Intervals are t intervals over the timed processes
(generate.processes) where perf.json has one number per process, else over the timed rows (labelled: the run-to-run
part is then missing)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from headline_bench.analysis.stats import finite, t_quantile

CONFIDENCE = 0.95
# what names a machine: hardware, cores and the libraries every technique runs on (env_info keys). Thread settings are
# not in it: a technique may set its own (tensor parallel ranks share the cores), so they are a fact of each cell.
MACHINE_KEYS = ("device", "gpu_count", "cpu", "cpu_id", "cpu_isa", "cpu_count", "python", "torch", "transformers")
THREAD_KEYS = ("torch_threads", "omp_num_threads")
NOT_VERSIONS = ("host", "platform")  # env keys that are neither the machine nor a version (the rest: engine, its build, ...)


def machine(env: dict[str, Any]) -> dict[str, Any]:
    return {k: env.get(k) for k in MACHINE_KEYS}


def isa_class(isa: str | None) -> str:
    """The widest vector extension in env's cpu_isa (what decides the CPU kernels)."""
    flags = set((isa or "").split())
    for name, flag in (("AMX", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16"), ("AVX-512", "avx512f"), ("AVX2", "avx2")):
        if flag in flags:
            return name
    return isa or "?"


def label(m: dict[str, Any]) -> str:
    """One short line naming a machine, for a column header."""
    if not any(m.values()):
        return "machine not recorded (no technique of this source ran)"
    if (m.get("gpu_count") or 0) > 0:
        hw = f"{m.get('device')} x{m.get('gpu_count')}"
    else:
        ident = str(m.get("cpu_id") or "")
        fam = ident.split(" family ")[-1].split(" stepping")[0].replace(" model ", "/") if " family " in ident else "?"
        hw = f"{m.get('cpu')} (family/model {fam}, {isa_class(m.get('cpu_isa'))}), {m.get('cpu_count')} cores"
    return f"{hw}, torch {m.get('torch')}, transformers {m.get('transformers')}"


def t_interval(point: float, values: list[float]) -> tuple[float, float]:
    """point ± t * sd / sqrt(n) of per-process values (their spread is the run-to-run variance)."""
    v = [x for x in values if finite(x)]
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(v) - 1) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    return point - half, point + half


def with_interval(point: float, per_process: list[Any]) -> tuple[float | None, float | None, str]:
    """The interval of `point` over the timed processes' own values (None without two of them) and its basis."""
    per = [v for v in per_process if finite(v)]
    if len(per) < 2:
        return None, None, "no per-process values: no interval"
    return *t_interval(point, per), f"t interval over {len(per)} timed processes"


def speed(perf: dict[str, Any]) -> dict[str, Any]:
    """TPOT (median and mean, ms) and tokens/s, each with its interval and the interval's basis.

    The median is the headline (a recompiling step or a slow first token in a few rows pulls the mean far off it);
    its interval needs per-process medians (perf.json has them since the timing lock). The mean's interval is over
    processes where perf.json has per-process means, else over the rows (labelled: without the run-to-run part)."""
    procs = perf.get("processes") or []
    out: dict[str, Any] = {}
    if finite(tps := perf.get("tokens_per_s")):
        lo, hi, basis = with_interval(tps, [p.get("tokens_per_s") for p in procs])
        out |= {"tokens_per_s": tps, "tokens_per_s_low": lo, "tokens_per_s_high": hi, "tokens_per_s_basis": basis}
    if finite(p50 := perf.get("tpot_s_p50")):
        lo, hi, basis = with_interval(p50, [p.get("tpot_s_p50") for p in procs])
        out |= {"tpot_ms": p50 * 1e3, "tpot_ms_low": lo and lo * 1e3, "tpot_ms_high": hi and hi * 1e3, "tpot_basis": f"median; {basis}"}
    if finite(mean := perf.get("tpot_s_mean")):
        lo, hi, basis = with_interval(mean, [p.get("tpot_s_mean") for p in procs])
        n, sd = perf.get("tpot_count") or 0, perf.get("tpot_s_stdev")
        if lo is None and n >= 2 and finite(sd):
            half = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)
            lo, hi, basis = mean - half, mean + half, f"t interval over {n} per-row TPOTs (rows only: run-to-run variance not included)"
        out |= {"tpot_mean_ms": mean * 1e3, "tpot_mean_ms_low": lo and lo * 1e3, "tpot_mean_ms_high": hi and hi * 1e3, "tpot_mean_basis": basis}
    return out


def memory(perf: dict[str, Any]) -> dict[str, Any]:
    """The peak memory perf.json has: CUDA allocator, else NVML (engines in another process), else process RSS."""
    for key, kind in (("max_allocated_mb", "CUDA allocator peak"), ("device_used_mb", "GPU memory in use (NVML)"), ("peak_rss_mb", "peak RSS")):
        if finite(perf.get(key)):
            return {"peak_mb": perf[key], "peak_kind": kind}
    return {}


def time_per_token(c: dict[str, Any]) -> tuple[float | None, str]:
    """Median TPOT (ms) where measured, else end-to-end ms per token (1000 / tokens/s: speculative lands several per step)."""
    if finite(c.get("tpot_ms")):
        return c["tpot_ms"], "TPOT"
    if finite(c.get("tokens_per_s")) and c["tokens_per_s"] > 0:
        return 1e3 / c["tokens_per_s"], "end-to-end"
    return None, ""


def ratios(cells: dict[str, dict[str, Any]], refs: list[str]) -> None:
    """Each cell's time per token over each reference's, within one column (one machine). Both sides TPOT where
    both have it, else both end-to-end; < 1: faster per token than the reference on that machine."""
    for c in cells.values():
        for ref in refs:
            r = cells.get(ref, {})
            mine, ref_t = time_per_token(c), time_per_token(r)
            if mine[1] != ref_t[1]:  # one side has no TPOT: compare end-to-end on both
                mine, ref_t = [(1e3 / x["tokens_per_s"], "end-to-end") if finite(x.get("tokens_per_s")) else (None, "") for x in (c, r)]
            if mine[0] is not None and ref_t[0]:
                c[f"vs_{ref}"] = {"ratio": mine[0] / ref_t[0], "basis": mine[1]}


def cell(entry: dict[str, Any]) -> dict[str, Any]:
    perf, score = entry["perf"], entry["score"]
    if perf.get("skipped") or perf.get("failed"):
        return {"outcome": "skipped" if perf.get("skipped") else "failed", "reason": perf.get("skipped") or perf.get("failed")}
    q = {k: score[k] for k in ("quality_state", "rougeL") if k in score}
    env = perf.get("env") or {}
    return {"outcome": "ran", **speed(perf), **memory(perf), **q, "threads": {k: env.get(k) for k in THREAD_KEYS},
            "versions": {k: v for k, v in env.items() if k not in (*MACHINE_KEYS, *THREAD_KEYS, *NOT_VERSIONS)}}


def columns(sources: dict[str, dict[str, dict[str, Any]]], refs: list[str]) -> list[dict[str, Any]]:
    """One column per (source, machine): its cells by technique. A technique without an environment (a skip decided
    before anything ran) goes to every machine of its source."""
    cols: list[dict[str, Any]] = []
    for rev, techniques in sources.items():
        found: dict[str, dict[str, Any]] = {}
        for entry in techniques.values():
            if entry["perf"].get("env"):
                m = machine(entry["perf"]["env"])
                found.setdefault(json.dumps(m, sort_keys=True), m)
        for key, m in (found or {"{}": {}}).items():  # nothing ran anywhere: one column, its machine unknown
            cells = {t: cell(e) for t, e in techniques.items() if not e["perf"].get("env") or json.dumps(machine(e["perf"]["env"]), sort_keys=True) == key}
            ratios(cells, refs)
            cols.append({"source": rev, "machine": m, "label": label(m), "cells": cells})
    seen: dict[str, int] = {}
    for c in cols:
        seen[c["label"]] = seen.get(c["label"], 0) + 1
    for i, c in enumerate(cols, 1):
        c["id"] = f"M{i}"
        c["title"] = f"{c['label']} @ {c['source']}" if seen[c["label"]] > 1 else c["label"]
    return cols
