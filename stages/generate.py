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
from prompts import Prompt, build_prompt, control_strings, has_chat_template, hf_tokenize, safe_ids
from techniques import build_model, check_hardware, pick_device, resolve
from trackers import AcceptanceTracker, Latency, MemoryTracker

GenerateFn = Callable[[list[str]], list[Generation]]


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run(generate_fn: GenerateFn, prompts: list[str], batch_size: int, warmup_runs: int, device: str,
        done: list[Generation] | None = None, on_batch: Callable[[list[Generation]], None] | None = None) -> tuple[list[Generation], dict[str, Any]]:
    """Warm up, then generate every prompt once, timing each batch; return generations and perf numbers.

    Args:
        generate_fn: a backend bound to its model and generate kwargs.
        prompts: all prompts, in row order.
        batch_size: prompts per call.
        warmup_runs: untimed calls on the first batch (compile, allocator and cache warm-up).
        device: "cpu" or "cuda", for the memory tracker.
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
    memory = MemoryTracker(device)
    gens: list[Generation] = list(done)
    wall = time.perf_counter()
    with memory.track():
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
        **{k: v for k, v in asdict(memory.get_memory()).items() if v is not None and k != "unit"},
    }
    return gens, perf


def prompts_for(rows: list[dict[str, Any]], tokenizer: Any, params: dict[str, Any], limit: int) -> tuple[list[Prompt], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build prompts with their token ids (the summary tokenized as plain text: prompts.safe_ids); rows whose
    prompt exceeds `limit` tokens are set aside with a reason, not dropped."""
    p = params["prompt"]
    chat = has_chat_template(tokenizer)
    controls = control_strings(tokenizer)
    prompts, kept, too_long = [], [], []
    for row in rows:
        prompt = build_prompt(row["summary"], p["template"], p["few_shot"], chat, tokenizer)
        prompt.ids, prompt.controls = safe_ids(prompt.parts, hf_tokenize(tokenizer), controls), controls
        n = len(prompt.ids)
        if n > limit:
            too_long.append({**row, "prediction": None, "skipped": f"prompt has {n} tokens > limit {limit}"})
            continue
        prompts.append(prompt)
        kept.append(row)
    return prompts, kept, too_long


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
    # Stop at the end of the first line. Newline tokens join the EOS ids rather than using `stop_strings`,
    # which assisted generation forwards to the draft without a tokenizer (and then fails).
    gen_kwargs = {**cfg["generate"], "eos_token_id": sorted(eos_ids(model) | newline_ids(tokenizer))}
    if cfg.get("compile"):
        from transformers import CompileConfig

        compile_config = CompileConfig(**cfg["compile"])
        compile_config._compile_all_devices = device == "cpu"  # generate() compiles on GPUs only unless told
        gen_kwargs["compile_config"] = compile_config
    acceptance = AcceptanceTracker()
    if cfg.get("speculative"):
        draft, draft_tok, _ = build_model({"model_name": params["base"]["model"], "dtype": cfg["dtype"]}, device)
        gen_kwargs.update(assistant_model=draft, **cfg["speculative"])
        if draft_tok.get_vocab() != tokenizer.get_vocab():
            gen_kwargs["assistant_tokenizer"] = draft_tok  # universal assisted decoding
        info["draft_weight_mb"] = weight_bytes(draft) / 2**20
    assisted = bool(cfg.get("speculative") or gen_kwargs.get("prompt_lookup_num_tokens"))
    if assisted:
        acceptance.attach(model)
    info["after_run"] = lambda: {"acceptance_rate": acceptance.rate(), "draft_tokens_proposed": acceptance.proposed,
                                 "draft_tokens_accepted": acceptance.accepted} if acceptance.attached else {}
    info["dtype"] = str(getattr(model, "dtype", cfg["dtype"])).replace("torch.", "")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 10**9)
    info["max_input_tokens"] = min(params["generate"]["max_input_tokens"], context - cfg["generate"]["max_new_tokens"])

    def generate_fn(prompts: list[str]) -> list[Generation]:
        return hf_generate(model, tokenizer, prompts, device, per_token=not assisted, **gen_kwargs)

    return generate_fn, tokenizer, info


def generate(name: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one technique over the rows. Returns generation records and the perf metrics.

    A technique that this machine cannot run returns no records and {"skipped": reason}.
    """
    cfg = resolve(params, name)
    device = pick_device(params["base"].get("device", "auto"))
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
    source = read_json(Path(info["path"]) / "source.json") if info.get("path") else {}
    prompts, kept, too_long = prompts_for(rows, tokenizer, params, info.pop("max_input_tokens", 10**9))
    if not prompts:
        raise InputError(f"{name}: every prompt is longer than the model's limit ({len(too_long)} rows)")
    log.info("%s: %d prompts (%d too long) on %s, model %s", name, len(prompts), len(too_long), device, cfg["model_name"])
    after_run = info.pop("after_run", dict)
    ckpt = checkpoint.open_checkpoint(name, cfg, params, kept, Generation, writer=tp.rank() == 0)
    gens, numbers = run(generate_fn, prompts, cfg["batch_size"], params["generate"]["warmup_runs"], device, ckpt.done, ckpt.append)
    records = [{**row, **asdict(g)} for row, g in zip(kept, gens)] + too_long
    if ckpt.writer:
        checkpoint.clear(name)  # every row is in `records` now
    perf.update(model=source, **info, samples=len(gens), rows_too_long=len(too_long), **numbers, **after_run(), resume=ckpt.facts())
    perf = tp.merge_ranks(perf)  # tensor parallel: memory summed over ranks; a no-op in a single process
    if cfg.get("compile") and numbers["warmup_s"]:
        # the first warm-up call compiles; the same prompts' timed call is the steady state
        perf["compile_s"] = numbers["warmup_s"][0] - gens[len(ckpt.done)].latency_s
    return records, perf


def write_outputs(name: str, records: list[dict[str, Any]], perf: dict[str, Any]) -> None:
    write_jsonl(GENERATIONS / f"{name}.jsonl", records)
    write_json(TECHNIQUE_METRICS / name / "perf.json", perf)
    if "skipped" in perf:
        log.info("%s: skip recorded -> %s", name, TECHNIQUE_METRICS / name / "perf.json")
    else:
        log.info("%s: %d samples of %s on %s, p50 %.3f s, %.1f tok/s -> %s, %s", name, perf["samples"], perf["config"]["model_name"], perf["device"],
                 perf["latency_s_p50"], perf["tokens_per_s"], GENERATIONS / f"{name}.jsonl", TECHNIQUE_METRICS / name / "perf.json")


def launch_parallel(name: str, cfg: dict[str, Any], params: dict[str, Any]) -> None:
    """Start tensor parallel ranks under torchrun; a technique they cannot run, or a failed launch, becomes
    a recorded skip so the rest of the pipeline goes on."""
    device = pick_device(params["base"].get("device", "auto"))
    skip = {"technique": name, "config": cfg, "env": env_info(), "device": device}
    try:
        check_hardware(cfg, device)
    except Skip as e:
        write_outputs(name, [], skip | {"skipped": str(e)})
        return
    code = tp.launch(name, tp.tp_size(cfg))
    if code != 0:
        write_outputs(name, [], skip | {"skipped": f"tensor parallel ranks failed (torchrun exit code {code}; the stage log has the error)"})


def main() -> None:
    setup_logging()
    if len(sys.argv) != 2:
        fail("usage: python stages/generate.py <technique>")
    name = sys.argv[1]
    params = load_params(required=["base", "generate", "prompt", "techniques"])
    try:
        cfg = resolve(params, name)
        if tp.needs_launch(cfg):  # re-run this stage as tp_size ranks under torchrun; rank 0 writes
            return launch_parallel(name, cfg, params)
        rows = read_jsonl(PREPARED / "test.jsonl")
        records, perf = generate(name, params, rows)
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"{name}: interrupted; finished rows are kept under {checkpoint.CHECKPOINTS}/ and the next run resumes after them")
    if tp.rank() == 0:
        write_outputs(name, records, perf)


if __name__ == "__main__":
    main()
