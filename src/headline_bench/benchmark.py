"""Run one technique over the prepared rows: set up its engine, build prompts, time it, and assemble perf.json."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from headline_bench import backends
from headline_bench.backends.base import Generation
from headline_bench.data.prompts import prompts_for
from headline_bench.errors import InputError, Skip
from headline_bench.files import GENERATIONS, TECHNIQUE_METRICS, read_json, write_json, write_jsonl
from headline_bench.logs import log
from headline_bench.measure import checkpoints as checkpoint
from headline_bench.measure.environment import env_info
from headline_bench.measure.roofline import MBU_FORMULA, bandwidth_share, kv_bytes_per_token, peak_bandwidth
from headline_bench.measure.runner import run_repeats
from headline_bench.measure.trackers import device_used_mb, timing_check
from headline_bench.models.ref import model_path, model_source
from headline_bench.techniques import tensor_parallel as tp
from headline_bench.techniques.config import check_hardware, pick_device, resolve


def settle(params: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    """The technique's config with every choice that depends on this machine made (device, tp_size "auto")."""
    cfg = resolve(params, name)
    device = pick_device(params["base"].get("device", "auto"))
    if cfg.get("parallel"):
        cfg = tp.settle_size(cfg, device, read_json(model_path(cfg["model_name"]) / "config.json"))
    return cfg, device


def bandwidth(cfg: dict[str, Any], info: dict[str, Any], gens: list[Generation], numbers: dict[str, Any], device: str) -> dict[str, Any]:
    """Achieved memory bandwidth of the decode steps and its share of the machine's peak (hardware.MBU_FORMULA)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path(cfg["model_name"]))
    dtype_bytes = info.get("kv_dtype_bytes") or getattr(torch, cfg["dtype"]).itemsize
    kv = kv_bytes_per_token(config, dtype_bytes) if cfg["generate"].get("use_cache", True) else 0
    context = sum(g.prompt_tokens for g in gens) / len(gens) + numbers["new_tokens_mean"] / 2
    if not info.get("weight_mb"):
        return {"bandwidth_share": None, "bandwidth_note": "n/a: this backend does not report its weight bytes"}
    peak = peak_bandwidth(device)
    if device.startswith("cuda") and perf_ranks(info) > 1 and peak["peak_bandwidth_gbs"]:  # TP: every GPU streams its shard at once
        peak = {"peak_bandwidth_gbs": peak["peak_bandwidth_gbs"] * perf_ranks(info), "peak_bandwidth_source": f"{peak['peak_bandwidth_source']} x {perf_ranks(info)} GPUs"}
    share = bandwidth_share(info["weight_mb"] * 2**20, kv, context, cfg["batch_size"], numbers.get("tpot_s_p50"), peak["peak_bandwidth_gbs"],
                            info.get("untied_embedding_bytes", 0), info.get("embedding_row_bytes", 0))
    return {**peak, "kv_bytes_per_token": kv, "mean_context_tokens": context, **share, "bandwidth_formula": MBU_FORMULA}


def perf_ranks(perf: dict[str, Any]) -> int:
    return int(perf.get("tp_size") or 1)


def generate(name: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one technique over the rows. Returns generation records and the perf metrics.

    A technique that this machine cannot run returns no records and {"skipped": reason}.
    """
    cfg, device = settle(params, name)
    perf: dict[str, Any] = {"technique": name, "config": cfg, "env": env_info(), "device": device}
    try:
        check_hardware(cfg, device)
        generate_fn, tokenizer, info = backends.setup(cfg, params, device)
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return [], {**perf, "skipped": str(e)}
    source = model_source(cfg["model_name"])
    prompts, kept, too_long = prompts_for(rows, tokenizer, params, info.pop("max_input_tokens", 10**9))
    if not prompts:
        raise InputError(f"{name}: every prompt is longer than the model's limit ({len(too_long)} rows)")
    log.info("%s: %d prompts (%d too long) on %s, model %s", name, len(prompts), len(too_long), device, cfg["model_name"])
    after_run, after_warmup = info.pop("after_run", dict), info.pop("after_warmup", lambda: None)
    warmup = params["generate"]["warmup_runs"]
    if (cfg.get("compile") or cfg.get("decode_loop")) and device.startswith("cuda"):
        warmup = max(warmup, 2)  # call 1 compiles, call 2 records the CUDA graphs: neither belongs in the timed run
    ckpt = checkpoint.open_checkpoint(name, cfg, params, kept, Generation, writer=tp.rank() == 0)
    info.pop("before_warmup", lambda rest: None)(prompts[len(ckpt.done) :])  # decode_loop: compile every cache shape first
    gens, numbers = run_repeats(generate_fn, prompts, cfg["batch_size"], warmup, device, int(params["generate"].get("repeats", 1)),
                                after_warmup, ckpt.done, ckpt.append)
    if info.pop("memory_external", False):  # the engine runs in another process: torch's counters here read ~0
        for key in ("max_allocated_mb", "max_reserved_mb", "peak_rss_mb"):
            numbers.pop(key, None)
        numbers["device_used_mb"] = device_used_mb()
        numbers["memory_note"] = "engine in its own process: NVML memory in use on the GPU(s) after the run, all processes, preallocated KV pool included"
    records = [{**row, **asdict(g)} for row, g in zip(kept, gens)] + too_long
    if ckpt.writer:
        checkpoint.clear(name)  # every row is in `records` now
    perf.update(model=source, **info, samples=len(gens), rows_too_long=len(too_long), warmup_runs=warmup, **numbers, **after_run(), resume=ckpt.facts())
    if source.get("random"):
        perf["quality"] = "n/a (random weights)"
    perf = tp.merge_ranks(perf)  # tensor parallel: memory and weight bytes summed over ranks; a no-op in a single process
    perf.update(bandwidth(cfg, perf, gens, numbers, device))
    perf.update(timing_check([g.timing_gap for g in gens[len(ckpt.done):]]))  # TTFT + (n-1) x TPOT vs end-to-end, per call
    if cfg.get("compile") and numbers["warmup_s"]:
        # the first warm-up call compiles; the same prompts' timed call is the steady state
        perf["compile_s"] = numbers["warmup_s"][0] - gens[len(ckpt.done)].latency_s
    return records, perf


def failure(name: str, params: dict[str, Any], error: BaseException) -> dict[str, Any]:
    """perf.json of a technique that raised: the reason in one line and the traceback's last lines."""
    import traceback

    lines = "".join(traceback.format_exception(error)).rstrip().splitlines()
    first = (str(error).strip().splitlines() or [""])[0][:300]
    perf: dict[str, Any] = {"technique": name, "failed": f"{type(error).__name__}: {first}", "traceback": lines[-12:]}
    try:
        perf |= {"config": resolve(params, name), "env": env_info()}
    except Exception:  # the failure may be in resolving itself
        pass
    return perf


def write_outputs(name: str, records: list[dict[str, Any]], perf: dict[str, Any]) -> None:
    write_jsonl(GENERATIONS / f"{name}.jsonl", records)
    write_json(TECHNIQUE_METRICS / name / "perf.json", perf)
    if "skipped" in perf or "failed" in perf:
        log.info("%s: %s recorded -> %s", name, "skip" if "skipped" in perf else "failure", TECHNIQUE_METRICS / name / "perf.json")
    else:
        log.info("%s: %d samples of %s on %s, p50 %.3f s, %.1f tok/s -> %s, %s", name, perf["samples"], perf["config"]["model_name"], perf["device"],
                 perf["latency_s_p50"], perf["tokens_per_s"], GENERATIONS / f"{name}.jsonl", TECHNIQUE_METRICS / name / "perf.json")


def launch_parallel(name: str, cfg: dict[str, Any], device: str) -> None:
    """Start tensor parallel ranks under torchrun; a technique they cannot run becomes a recorded skip, a failed
    launch a recorded failure, so the rest of the pipeline goes on."""
    base = {"technique": name, "config": cfg, "env": env_info(), "device": device}
    try:
        check_hardware(cfg, device)
    except Skip as e:
        write_outputs(name, [], base | {"skipped": str(e)})
        return
    code = tp.launch(name, tp.tp_size(cfg))
    if code != 0:
        write_outputs(name, [], base | {"failed": f"tensor parallel ranks failed (torchrun exit code {code}; the stage log has the error)"})
