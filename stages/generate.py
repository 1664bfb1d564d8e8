"""Generate: run one technique (argv[1]) over data/prepared/test.jsonl in its own process and write
data/generations/<technique>.jsonl (per-sample predictions and timings) and
metrics/techniques/<technique>/perf.json (latency, throughput, memory, environment)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import checkpoint
import tp
from backends import Generation, eos_ids, hf_generate, newline_ids
from common import (
    GENERATIONS,
    PREPARED,
    TECHNIQUE_METRICS,
    InputError,
    Skip,
    env_info,
    fail,
    load_params,
    log,
    read_json,
    read_jsonl,
    setup_logging,
    write_json,
    write_jsonl,
)
from hardware import MBU_FORMULA, bandwidth_share, kv_bytes_per_token, peak_bandwidth
from prompts import Prompt, build_prompt, control_strings, has_chat_template, hf_tokenize, safe_ids
from techniques import build_model, check_hardware, model_path, model_source, pick_device, resolve
from trackers import AcceptanceTracker, EnergyTracker, Latency, MemoryTracker, device_used_mb

GenerateFn = Callable[[list[str]], list[Generation]]


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
        "energy_j": energy.joules,
        "energy_source": energy.reason,
        "energy_j_per_headline": energy.joules / len(gens) if energy.joules is not None else None,
        "energy_j_per_token": energy.joules / new_tokens if energy.joules is not None and new_tokens else None,
        **{k: v for k, v in asdict(memory.get_memory()).items() if v is not None and k != "unit"},
        "rss_reset": memory.rss_reset,  # False: VmHWM could not be reset, so peak_rss_mb may be an earlier peak
    }
    return gens, perf


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


def prompts_for(rows: list[dict[str, Any]], tokenizer: Any, params: dict[str, Any], limit: int) -> tuple[list[Prompt], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build prompts with their token ids (the summary tokenized as plain text: prompts.safe_ids); rows whose
    prompt exceeds `limit` tokens are set aside with a reason, not dropped."""
    p = params["prompt"]
    chat = has_chat_template(tokenizer)
    controls = control_strings(tokenizer)
    prompts, kept, too_long = [], [], []
    for row in rows:
        prompt = build_prompt(row["summary"], p["template"], p["few_shot"], chat, tokenizer, p.get("date"))
        prompt.ids, prompt.controls = safe_ids(prompt.parts, hf_tokenize(tokenizer), controls), controls
        n = len(prompt.ids)
        if n > limit:
            too_long.append({**row, "prediction": None, "skipped": f"prompt has {n} tokens > limit {limit}"})
            continue
        prompts.append(prompt)
        kept.append(row)
    return prompts, kept, too_long


DRAFT_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def configure_draft(draft: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Put the speculative settings where transformers reads them: the draft's own generation config.

    `num_assistant_tokens` passed to the target's generate() is ignored: the candidate generator copies the
    draft's generation_config (defaults: 20 tokens, a 0.4 confidence cut-off). A constant schedule keeps the
    draft length from drifting across calls (the heuristic one carries state from warm-up into timed rows).

    Returns:
        the settings in effect, as the draft's config now holds them (recorded in perf.json).
    """
    unknown = set(settings) - set(DRAFT_KEYS)
    if unknown:
        raise InputError(f"speculative: unknown setting(s) {sorted(unknown)}; known: {list(DRAFT_KEYS)}")
    config = draft.generation_config
    config.num_assistant_tokens_schedule = "constant"
    for key, value in settings.items():
        setattr(config, key, value)
    return {key: getattr(config, key, None) for key in DRAFT_KEYS}


def hf_setup(cfg: dict[str, Any], params: dict[str, Any], device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """Load the technique's model(s) and bind hf_generate to them and to its generate kwargs.

    Returns:
        the bound generate function, the tokenizer (for prompts) and load facts; `info["after_run"]`
        gives the numbers only known after the timed run (acceptance rate).
    """
    from compress import weight_bytes

    model, tokenizer, info = build_model(cfg, device)
    info["weight_mb"] = weight_bytes(model) / 2**20
    info.update(getattr(model, "compression_facts", {}))
    if info.get("random_weights"):
        # Random weights never write a meaningful newline or EOS: a fixed output length (vLLM's --ignore-eos,
        # optimum-benchmark's min_new_tokens == max_new_tokens) makes every technique do the same work.
        n = cfg["generate"]["max_new_tokens"]
        gen_kwargs = {**cfg["generate"], "min_new_tokens": n, "eos_token_id": sorted(eos_ids(model))}
    else:
        # Stop at the end of the first line. Newline tokens join the EOS ids rather than using `stop_strings`,
        # which assisted generation forwards to the draft without a tokenizer (and then fails).
        gen_kwargs = {**cfg["generate"], "eos_token_id": sorted(eos_ids(model) | newline_ids(tokenizer))}
    if cfg.get("compile"):
        from transformers import CompileConfig

        settings = dict(cfg["compile"])
        if isinstance(settings.get("mode"), dict):  # {cpu: default, cuda: reduce-overhead}: CUDA graphs only on GPUs
            settings["mode"] = settings["mode"]["cuda" if device.startswith("cuda") else "cpu"]
        compile_config = CompileConfig(**settings)
        compile_config._compile_all_devices = device == "cpu"  # generate() compiles on GPUs only unless told
        gen_kwargs["compile_config"] = compile_config
        info["compile_mode"] = settings.get("mode", "default")
    acceptance = AcceptanceTracker()
    if cfg.get("speculative"):
        draft, draft_tok, _ = build_model({"model_name": params["base"]["model"], "dtype": cfg["dtype"]}, device)
        info["speculative_used"] = configure_draft(draft, cfg["speculative"])
        gen_kwargs["assistant_model"] = draft
        if draft_tok.get_vocab() != tokenizer.get_vocab():
            gen_kwargs["assistant_tokenizer"] = draft_tok  # universal assisted decoding
            info["universal_assisted"] = True
        info["draft_weight_mb"] = weight_bytes(draft) / 2**20
    assisted = bool(cfg.get("speculative") or gen_kwargs.get("prompt_lookup_num_tokens"))
    if assisted:
        acceptance.attach(model)
    info["after_warmup"] = acceptance.reset  # acceptance over the timed rows only
    info["after_run"] = lambda: {"acceptance_rate": acceptance.rate(), "draft_tokens_proposed": acceptance.proposed,
                                 "draft_tokens_accepted": acceptance.accepted} if acceptance.attached else {}
    info["dtype"] = str(getattr(model, "dtype", cfg["dtype"])).replace("torch.", "")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 10**9)
    info["max_input_tokens"] = min(params["generate"]["max_input_tokens"], context - cfg["generate"]["max_new_tokens"])

    def generate_fn(prompts: list[str]) -> list[Generation]:
        before = (acceptance.proposed, acceptance.accepted)
        gens = hf_generate(model, tokenizer, prompts, device, per_token=not assisted, **gen_kwargs)
        if acceptance.attached and len(gens) == 1:  # assisted decoding runs one row per call
            gens[0].draft_proposed, gens[0].draft_accepted = acceptance.proposed - before[0], acceptance.accepted - before[1]
        return gens

    return generate_fn, tokenizer, info


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
    share = bandwidth_share(info["weight_mb"] * 2**20, kv, context, cfg["batch_size"], numbers.get("tpot_s_p50"), peak["peak_bandwidth_gbs"])
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
        if cfg["backend"] == "hf":
            generate_fn, tokenizer, info = hf_setup(cfg, params, device)
        else:
            from engines import setup as engine_setup  # llama.cpp / vLLM

            generate_fn, tokenizer, info = engine_setup(cfg, params, device)
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return [], {**perf, "skipped": str(e)}
    source = read_json(Path(info["path"]) / "source.json") if info.get("path") and (Path(info["path"]) / "source.json").exists() else model_source(cfg["model_name"])
    prompts, kept, too_long = prompts_for(rows, tokenizer, params, info.pop("max_input_tokens", 10**9))
    if not prompts:
        raise InputError(f"{name}: every prompt is longer than the model's limit ({len(too_long)} rows)")
    log.info("%s: %d prompts (%d too long) on %s, model %s", name, len(prompts), len(too_long), device, cfg["model_name"])
    after_run, after_warmup = info.pop("after_run", dict), info.pop("after_warmup", lambda: None)
    warmup = params["generate"]["warmup_runs"]
    if cfg.get("compile") and device.startswith("cuda"):
        warmup = max(warmup, 2)  # call 1 compiles, call 2 records the CUDA graphs: neither belongs in the timed run
    ckpt = checkpoint.open_checkpoint(name, cfg, params, kept, Generation, writer=tp.rank() == 0)
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


def main() -> None:
    setup_logging()
    if len(sys.argv) != 2:
        fail("usage: python stages/generate.py <technique>")
    name = sys.argv[1]
    params = load_params(required=["base", "generate", "prompt", "techniques"])
    try:
        cfg, device = settle(params, name)
        if tp.needs_launch(cfg):  # re-run this stage as tp_size ranks under torchrun; rank 0 writes
            return launch_parallel(name, cfg, device)
        rows = read_jsonl(PREPARED / "test.jsonl")
        records, perf = generate(name, params, rows)
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"{name}: interrupted; finished rows are kept under {checkpoint.CHECKPOINTS}/ and the next run resumes after them")
    except Skip as e:
        records, perf = [], {"technique": name, "skipped": str(e)}
    except Exception as e:  # an unsupported kernel, CUDA out of memory...: recorded, and the other techniques still run
        log.exception("%s failed", name)
        records, perf = [], failure(name, params, e)
    if tp.rank() == 0:
        write_outputs(name, records, perf)


if __name__ == "__main__":
    main()
