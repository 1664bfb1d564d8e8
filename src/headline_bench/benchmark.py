"""Run one technique over the prepared rows: set up its engine, build prompts, time it, and assemble perf.json."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from headline_bench import backends
from headline_bench.backends.base import Generation
from headline_bench.children import die_with_parent, run_child, send_test_signal
from headline_bench.data.prompts import prompts_for
from headline_bench.errors import InputError, ProcessDied, Skip, exit_reason, fail
from headline_bench.files import (
    GENERATIONS,
    LOSSLESS,
    QUALITY,
    QUALITY_ROWS,
    TECHNIQUE_METRICS,
    TIMED_ROWS,
    keep_finished,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from headline_bench.logs import log
from headline_bench.measure import checkpoints as checkpoint
from headline_bench.measure.environment import env_info
from headline_bench.measure.records import Perf, assemble, join
from headline_bench.measure.roofline import MBU_FORMULA, bandwidth_share, kv_bytes_per_token, peak_bandwidth
from headline_bench.measure.runner import merge_processes, run, run_repeats
from headline_bench.measure.timing_lock import timed_section
from headline_bench.measure.trackers import device_used_mb, timing_check
from headline_bench.models.ref import model_path, model_source
from headline_bench.settings import Params
from headline_bench.techniques import tensor_parallel as tp
from headline_bench.techniques.config import ResolvedTechnique, check_hardware, pick_device, resolve


def settle(params: Params, name: str) -> tuple[ResolvedTechnique, str]:
    """The technique's config with every choice that depends on this machine made (device, tp_size "auto")."""
    cfg = resolve(params, name)
    device = pick_device(params.base.device)
    if cfg.parallel:
        cfg = tp.settle_size(cfg, device, read_json(model_path(cfg.model_name) / "config.json"))
    return cfg, device


def bandwidth(cfg: ResolvedTechnique, info: dict[str, Any], gens: list[Generation], numbers: dict[str, Any], device: str) -> dict[str, Any]:
    """Achieved memory bandwidth of the decode steps and its share of the machine's peak (hardware.MBU_FORMULA)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path(cfg.model_name))
    dtype_bytes = info.get("kv_dtype_bytes") or getattr(torch, cfg.dtype).itemsize
    kv = kv_bytes_per_token(config, dtype_bytes) if cfg.generate.use_cache else 0
    context = sum(g.prompt_tokens for g in gens) / len(gens) + numbers["new_tokens_mean"] / 2
    if not info.get("weight_mb"):
        return {"bandwidth_share": None, "bandwidth_note": "n/a: this backend does not report its weight bytes"}
    peak = peak_bandwidth(device)
    if device.startswith("cuda") and perf_ranks(info) > 1 and peak["peak_bandwidth_gbs"]:  # TP: every GPU streams its shard at once
        peak = {"peak_bandwidth_gbs": peak["peak_bandwidth_gbs"] * perf_ranks(info), "peak_bandwidth_source": f"{peak['peak_bandwidth_source']} x {perf_ranks(info)} GPUs"}
    share = bandwidth_share(info["weight_mb"] * 2**20, kv, context, cfg.batch_size, numbers.get("tpot_s_p50"), peak["peak_bandwidth_gbs"],
                            info.get("untied_embedding_bytes", 0), info.get("embedding_row_bytes", 0))
    return {**peak, "kv_bytes_per_token": kv, "mean_context_tokens": context, **share, "bandwidth_formula": MBU_FORMULA}


def perf_ranks(perf: dict[str, Any]) -> int:
    return int(perf.get("tp_size") or 1)


def generate(name: str, params: Params, rows: list[dict[str, Any]], resume: bool = True,
             keep_checkpoint: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one technique over the rows in this process (one timed process). Returns generation records and the perf metrics.

    A technique that this machine cannot run returns no records and {"skipped": reason}.

    Args:
        resume: continue from the technique's checkpoint and write one (the first timed process); False: neither.
        keep_checkpoint: leave the checkpoint for the caller to delete (run_processes does, once every process is done).
    """
    cfg, device = settle(params, name)
    env = env_info(cfg.engine)
    head: dict[str, Any] = {"technique": name, "config": cfg.record(), "env": env, "device": device}
    try:
        check_hardware(cfg, device)
        generate_fn, tokenizer, info = backends.setup(cfg, params, device)
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return [], assemble(Perf, head, {"skipped": str(e)})
    source = model_source(cfg.model_name)
    prompts, kept, too_long = prompts_for(rows, tokenizer, params.prompt, info.pop("max_input_tokens", 10**9))
    if not prompts:
        raise InputError(f"{name}: every prompt is longer than the model's limit ({len(too_long)} rows)")
    log.info("%s: %d prompts (%d too long) on %s, model %s", name, len(prompts), len(too_long), device, cfg.model_name)
    after_run, after_warmup = info.pop("after_run", dict), info.pop("after_warmup", lambda: None)
    warmup, warmup_batches = params.generate.warmup_runs, 1
    if (cfg.compile or cfg.decode_loop) and device.startswith("cuda"):
        warmup = max(warmup, 2)  # call 1 compiles, call 2 records the CUDA graphs: neither belongs in the timed run
    elif cfg.compile:
        # a compiled generate() sees a new shape with the second prompt length, and torch.compile's automatic dynamic
        # shapes then recompile once: a second warm-up call, on the second batch, keeps that compile out of the timed
        # rows (cpu_fast: a 42 s first timed row on a 2-core Intel). CUDA keeps both calls on one batch for its graphs.
        warmup, warmup_batches = max(warmup, 2), 2
    ckpt = checkpoint.open_checkpoint(name, cfg, params, kept, Generation, env, writer=tp.rank() == 0) if resume else checkpoint.disabled()
    info.pop("before_warmup", lambda rest: None)(prompts[len(ckpt.done) :])  # decode_loop: compile every cache shape first
    with timed_section(f"generate {name}") as lock:  # loading above may overlap other work; warm-up and timing may not
        gens, numbers = run_repeats(generate_fn, prompts, cfg.batch_size, warmup, device, params.generate.repeats,
                                    after_warmup, ckpt.done, ckpt.append, warmup_batches=warmup_batches)
    if info.pop("memory_external", False):  # the engine runs in another process: torch's counters here read ~0
        for key in ("max_allocated_mb", "max_reserved_mb", "peak_rss_mb"):
            numbers.pop(key, None)
        numbers["device_used_mb"] = device_used_mb()
        numbers["memory_note"] = "engine in its own process: NVML memory in use on the GPU(s) after the run, all processes, preallocated KV pool included"
    records = [{**row, **asdict(g)} for row, g in zip(kept, gens)] + too_long
    if ckpt.writer and not keep_checkpoint:
        checkpoint.clear(name)  # every row is in `records` now
    # tensor parallel: memory and weight bytes summed over ranks (a deliberate replacement); a no-op in a single process
    measured = tp.merge_ranks(join(info, numbers))
    extra: dict[str, Any] = {"quality": "n/a (random weights)"} if source.get("random") else {}
    extra |= timing_check([g.timing_gap for g in gens[len(ckpt.done) :]])  # TTFT + (n-1) x TPOT vs end-to-end, per call
    if cfg.compile and numbers["warmup_s"]:
        # the first warm-up call compiles; the same prompts' timed call is the steady state
        extra["compile_s"] = numbers["warmup_s"][0] - gens[len(ckpt.done)].latency_s
    perf = assemble(Perf, head, {"model": source, "samples": len(gens), "rows_too_long": len(too_long), "warmup_runs": warmup}, measured,
                    after_run(), {"resume": ckpt.facts(), "timing_lock": lock.facts(), "timing_lock_wait_s": lock.wait_s}, extra, bandwidth(cfg, measured, gens, numbers, device))
    return records, perf


def failure(name: str, params: Params, error: BaseException) -> dict[str, Any]:
    """perf.json of a technique that raised: the reason in one line and the traceback's last lines."""
    import traceback

    lines = "".join(traceback.format_exception(error)).rstrip().splitlines()
    first = (str(error).strip().splitlines() or [""])[0][:300]
    perf: dict[str, Any] = {"technique": name, "failed": f"{type(error).__name__}: {first}", "traceback": lines[-12:]}
    try:
        cfg = resolve(params, name)
        perf |= {"config": cfg.record(), "env": env_info(cfg.engine)}
    except Exception:  # the failure may be in resolving itself
        pass
    return assemble(Perf, perf)


def write_outputs(name: str, records: list[dict[str, Any]], perf: dict[str, Any]) -> None:
    """Write the technique's generations and perf.json. A failure or skip never replaces a finished measurement
    (files.keep_finished: the stage exits non-zero and DVC keeps them); with nothing finished to keep it is recorded."""
    keep_finished(name, perf, GENERATIONS / f"{name}.jsonl", TECHNIQUE_METRICS / name / "perf.json")
    perf = assemble(Perf, perf)  # every perf.json written is checked against its one definition
    write_jsonl(GENERATIONS / f"{name}.jsonl", records)
    write_json(TECHNIQUE_METRICS / name / "perf.json", perf)
    if "skipped" in perf or "failed" in perf:
        log.info("%s: %s recorded -> %s", name, "skip" if "skipped" in perf else "failure", TECHNIQUE_METRICS / name / "perf.json")
    else:
        log.info("%s: %d samples of %s on %s, p50 %.3f s, %.1f tok/s -> %s, %s", name, perf["samples"], perf["config"]["model_name"], perf["device"],
                 perf["latency_s_p50"], perf["tokens_per_s"], GENERATIONS / f"{name}.jsonl", TECHNIQUE_METRICS / name / "perf.json")


def guarded(name: str, params: Params, work: Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a stage's work on one technique: bad input and interruptions stop the stage with one line; a technique
    this machine cannot run is a recorded skip, and one that raises a recorded failure, so the other techniques still run."""
    try:
        return work()
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"{name}: interrupted; finished rows are kept under {checkpoint.CHECKPOINTS}/ and the next run resumes after them")
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return [], {"technique": name, "skipped": str(e)}
    except Exception as e:  # an unsupported kernel, CUDA out of memory...
        log.exception("%s failed", name)
        return [], failure(name, params, e)


WORKERS = checkpoint.CHECKPOINTS.parent / "processes"  # each timed or quality process's result, until the stage reads it


def worker(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Run a stage's child process (children.run_child: it dies with the stage) to its end.

    Raises:
        ProcessDied: it was killed by a signal (SIGILL from an engine built for another CPU, the OOM killer): the
            technique's recorded failure, so the pipeline goes on.
        InputError: another non-zero exit (bad input or an interruption: the process said why in one line above).
    """
    code = run_child(cmd, env)
    if code < 0:
        raise ProcessDied(f"{what} died by {exit_reason(code)}")
    if code != 0:
        raise InputError(f"{what} exited with code {code}")


def run_processes(name: str, params: Params, rows_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`generate.processes` fresh timed processes of one technique, one after another, merged (runner.merge_processes).

    Each is `python stages/generate.py <technique> --process k --out <file>` (tensor parallel: under torchrun, rank 0
    writes), so process-to-process variance (allocator, page cache, CPU frequency, thread placement) is measured, not
    only pass-to-pass. With `processes: 1` the stage's own process is the timed one. Only process 1 resumes from and
    writes the row checkpoint (the caller deletes it). A process that is skipped or fails ends the technique with that record.
    """
    cfg, device = settle(params, name)  # an unknown technique is an error before any file is read
    check_hardware(cfg, device)
    count = params.generate.processes
    results = []
    for k in range(1, count + 1):
        if count == 1 and not tp.needs_launch(cfg):
            records, perf = generate(name, params, read_jsonl(rows_path), keep_checkpoint=True)
            results.append({"records": records, "perf": perf | {"process": 1, "pid": os.getpid()}})
            break
        out = WORKERS / f"{name}-{k}.json"
        out.unlink(missing_ok=True)
        extra = ("--process", str(k), "--out", str(out))
        log.info("%s: timed process %d of %d", name, k, count)
        if tp.needs_launch(cfg):  # the ranks wait for each other, so the launcher holds the timing lock for them
            with timed_section(f"generate {name} ranks") as lock:
                code = tp.launch(name, cfg.tp_size, env={checkpoint.LOCK_HELD: name}, extra=extra)
            if code != 0:
                raise RuntimeError(f"tensor parallel ranks of timed process {k} failed (torchrun exit code {code}; the stage log has the error)")
        else:
            worker([sys.executable, str(tp.GENERATE), name, *extra], os.environ | {checkpoint.LOCK_HELD: name}, f"{name}: timed process {k} of {count}")
        results.append(read_json(out))
        if tp.needs_launch(cfg):  # the ranks found the lock held by the launcher: its wait is the process's
            results[-1]["perf"] |= {"timing_lock": lock.facts(), "timing_lock_wait_s": lock.wait_s}
        out.unlink()
        if "skipped" in results[-1]["perf"] or "failed" in results[-1]["perf"]:
            break
    if skip := next((r["perf"] for r in results if "skipped" in r["perf"] or "failed" in r["perf"]), None):
        return [], skip
    records, perf = merge_processes(results)
    gens = [Generation(**{k: r[k] for k in Generation.__dataclass_fields__}) for r in records if "latency_s" in r]
    perf.update(bandwidth(cfg, perf, gens, perf, device))  # from the merged time per token
    return records, perf


def timed_process(name: str, params: Params, rows_path: Path, k: int, out: Path) -> None:
    """One timed process (`generate.py <technique> --process k`): generate() over the rows, then its records and perf to `out`."""
    die_with_parent()  # a torchrun rank: its parent is torchrun, which dies with the stage
    send_test_signal(name)
    records, perf = guarded(name, params, lambda: generate(name, params, read_jsonl(rows_path), resume=k == 1, keep_checkpoint=True))
    if tp.rank() == 0:
        write_json(out, {"records": records, "perf": perf | {"process": k, "pid": os.getpid(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})


# generation record fields that are timings: left out of quality-pass records, which are not timed
TIMING_FIELDS = ("latency_s", "ttft_s", "tpot_s", "latency_s_passes", "latency_s_processes")


def quality_batch_size(cfg: ResolvedTechnique, params: Params) -> int:
    """Prompts per call in the quality pass: `generate.quality_batch_size` where the technique can batch; 1 for
    llama.cpp (one prompt at a time here), assisted decoding (transformers drafts for one row per call) and compiled
    techniques at their timed batch of 1: compiled graphs are per shape, and a batch of 8 is a new set (compiled_loop_cpu:
    66 s for its first batch of 8 and ~45 s per new cache bucket, 156 s for the pass on a 2-core Intel), while at batch 1
    the quality pass and the timed runs share their graphs through Inductor's cache (.cache in the workspace): whichever
    stage runs first compiles them cold (dvc runs a technique's quality stage before its generate stage)."""
    assisted = cfg.speculative or cfg.generate.prompt_lookup_num_tokens
    compiled_at_one = (cfg.compile or cfg.decode_loop) and cfg.batch_size == 1
    if cfg.engine == "llama_cpp" or assisted or compiled_at_one:
        return 1
    return params.generate.quality_batch_size


def quality_pass(name: str, params: Params, rows_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate every quality row once, untimed, batched where the technique can batch (MLPerf's accuracy mode).

    Lossless techniques (a `reference`) are not run: the score stage gives them their reference's quality once their
    token ids equal the reference's on the timed rows. Records carry no timings (the timed pass measures speed);
    `quality.json` records the batch size, rows and wall time. Resumes like the timed pass (checkpoint `<name>.quality`).
    """
    cfg, device = settle(params, name)
    rows = read_jsonl(rows_path)
    facts: dict[str, Any] = {"technique": name, "rows": len(rows)}
    if cfg.reference:
        return [], facts | {"not_run": f"lossless (reference {cfg.reference}): it takes its reference's quality once its token ids "
                                       "equal the reference's on the timed rows (score.json)", "reference": cfg.reference}
    if tp.needs_launch(cfg):
        raise Skip("the quality pass does not start torchrun; tensor parallel techniques are scored on their timed rows")
    # use_cache changes speed, not the function: the quality pass decodes with the KV cache (the uncached baseline's
    # 400-row pass took ~7 s a row at batch 8 on 2 cores, 15x the cached one); batched_vs_timed in score.json compares
    # its outputs with the technique's own timed (uncached, batch-1) outputs on the timed rows
    uncached = cfg.generate.use_cache is False
    cfg = cfg.model_copy(update={"batch_size": quality_batch_size(cfg, params),
                                 "generate": cfg.generate.model_copy(update={"use_cache": True}) if uncached else cfg.generate})
    check_hardware(cfg, device)
    source = model_source(cfg.model_name)
    if source.get("random"):
        raise Skip("random weights: quality is n/a")
    generate_fn, tokenizer, info = backends.setup(cfg, params, device)
    prompts, kept, too_long = prompts_for(rows, tokenizer, params.prompt, info.get("max_input_tokens", 10**9))
    ckpt = checkpoint.open_checkpoint(f"{name}.quality", cfg, params, kept, Generation, env_info(cfg.engine))
    log.info("%s: quality pass over %d rows (%d resumed), batch %d, on %s", name, len(prompts), len(ckpt.done), cfg.batch_size, device)
    gens, numbers = run(generate_fn, prompts, cfg.batch_size, 0, device, done=ckpt.done, on_batch=ckpt.append)
    records = [{**row, **{k: v for k, v in asdict(g).items() if k not in TIMING_FIELDS}} for row, g in zip(kept, gens)] + too_long
    checkpoint.clear(f"{name}.quality")
    return records, facts | {"device": device, "batch_size": cfg.batch_size, "samples": len(gens), "rows_too_long": len(too_long),
                             "wall_s": numbers["wall_s"], "wall_note": "this session's generation time, untimed pass (no warm-up; compile included)",
                             **({"cache_note": "decoded with the KV cache (the timed pass keeps use_cache: false; batched_vs_timed in "
                                               "score.json compares the outputs)"} if uncached else {}),
                             "dtype": info.get("dtype"), "model": source, "config": cfg.record(), "resume": ckpt.facts()}


def checked(name: str, params: Params) -> bool:
    """Whether the technique runs the lossless check pass: lossless ones (a `reference`) and the ones that are no lossy
    family member (baseline, another model such as target_only: what lossless techniques reproduce). Decided from the
    technique's own entry and score.family only, so editing one technique never reruns every quality stage."""
    entry = params.entry(name)
    return bool(entry.reference) or name not in (params.score.family if params.score else [])


def check_pass(name: str, params: Params, rows_path: Path, timed_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The lossless check's further rows: the technique exactly as timed (its batch size, cache and kernels), untimed,
    over the first `generate.check_rows` quality rows that are not timed rows.

    Run by lossless techniques and by the techniques they reproduce (checked()), so that the score stage compares token ids on
    timed_rows + check_rows rows instead of the timed rows alone (8 identical rows bound the share of differing rows
    only at 31%, 30 at 10%). Other techniques return no records.
    """
    cfg, device = settle(params, name)
    if not checked(name, params) or not params.generate.check_rows:
        return [], {}
    timed = {r["id"] for r in read_jsonl(timed_path)}
    rows = [r for r in read_jsonl(rows_path) if r["id"] not in timed][: params.generate.check_rows]
    if not rows:  # every quality row is a timed row: the check compares the timed rows alone
        return [], {"rows": 0, "note": "no quality rows beyond the timed ones"}
    check_hardware(cfg, device)
    if tp.needs_launch(cfg):
        raise Skip("the check pass does not start torchrun; tensor parallel techniques are checked on their timed rows")
    generate_fn, tokenizer, info = backends.setup(cfg, params, device)
    prompts, kept, too_long = prompts_for(rows, tokenizer, params.prompt, info.get("max_input_tokens", 10**9))
    info.get("before_warmup", lambda rest: None)(prompts)  # decode_loop: compile every cache shape first
    log.info("%s: lossless check pass over %d further rows, batch %d, on %s", name, len(prompts), cfg.batch_size, device)
    gens, numbers = run(generate_fn, prompts, cfg.batch_size, 0, device)
    records = [{**row, **{k: v for k, v in asdict(g).items() if k not in TIMING_FIELDS}} for row, g in zip(kept, gens)] + too_long
    return records, {"rows": len(records), "batch_size": cfg.batch_size, "wall_s": numbers["wall_s"], "device": device}


QUALITY_SCRIPT = tp.GENERATE.parent / "quality.py"


def quality_process(name: str, params: Params) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The quality pass in a fresh child process (`quality.py <technique> --out <file>`), like generate's timed
    processes: an engine that dies by a signal there is this technique's recorded failure (ProcessDied), not the
    end of the stage and of `dvc repro`. A technique this machine cannot run starts no engine, so its skip is
    recorded in this process (the same records; a child costs ~3 s of imports, 8 of them on a CPU run)."""
    cfg, device = settle(params, name)
    try:
        check_hardware(cfg, device)
    except Skip:
        return quality_results(name, params, QUALITY_ROWS)
    out = WORKERS / f"{name}.quality.json"
    out.unlink(missing_ok=True)
    worker([sys.executable, str(QUALITY_SCRIPT), name, "--out", str(out)], dict(os.environ), f"{name}: quality process")
    result = read_json(out)
    out.unlink()
    return result["records"], result["facts"]


def quality_results(name: str, params: Params, rows_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """quality_pass() over the rows, then the lossless check pass in the same process (its records in the facts)."""
    records, facts = guarded(name, params, lambda: quality_pass(name, params, rows_path))
    if not (facts.get("failed") or facts.get("skipped")):  # the lossless check's further rows, in the same process
        checked_records, check_facts = guarded(name, params, lambda: check_pass(name, params, rows_path, TIMED_ROWS))
        if check_facts:
            facts = facts | {"lossless_check": check_facts | {"records": checked_records}}
    return records, facts


def quality_worker(name: str, params: Params, rows_path: Path, out: Path) -> None:
    """The quality process (`quality.py <technique> --out <file>`): quality_results() to `out`."""
    die_with_parent()
    send_test_signal(name)
    records, facts = quality_results(name, params, rows_path)
    write_json(out, {"records": records, "facts": facts})


def write_quality(name: str, records: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    """Write the quality pass's records and quality.json, and the lossless check pass's records (data/lossless/, carried
    in facts["lossless_check"]["records"]); a failure or skip never replaces a finished pass (files.keep_finished)."""
    keep_finished(name, facts, QUALITY / f"{name}.jsonl", TECHNIQUE_METRICS / name / "quality.json")
    check = dict(facts.get("lossless_check") or {})
    checked_records = check.pop("records", [])
    facts = {k: v for k, v in facts.items() if k != "lossless_check"} | ({"lossless_check": check} if check else {})
    write_jsonl(LOSSLESS / f"{name}.jsonl", checked_records)
    write_jsonl(QUALITY / f"{name}.jsonl", records)
    write_json(TECHNIQUE_METRICS / name / "quality.json", facts)
    log.info("%s: quality pass %s -> %s", name, next((facts[k] for k in ("not_run", "skipped", "failed") if k in facts), f"{len(records)} rows"),
             QUALITY / f"{name}.jsonl")
