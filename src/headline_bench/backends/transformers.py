"""The transformers engine: offline generation through generate(), and `transformers serve`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList

from headline_bench.backends.base import GenerateFn, Generation, ServerSpec, count_new_tokens, missing
from headline_bench.data.prompts import clean_headline
from headline_bench.errors import InputError, Skip
from headline_bench.measure.trackers import (
    AcceptanceTracker,
    LatencyTracker,
    TokenTimer,
    step_clock,
    timing_gap,
    ttft_tpot,
)
from headline_bench.models.ref import model_path
from headline_bench.techniques.load import build_model

if TYPE_CHECKING:
    from headline_bench.settings import Params, ServingEntry, Speculative
    from headline_bench.techniques.config import ResolvedTechnique


def eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def newline_ids(tokenizer: Any) -> set[int]:
    """Ids of every token whose text contains a newline: generating one ends the headline's first line."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i for i, text in enumerate(texts) if "\n" in text}


def encode(tokenizer: Any, prompts: list[Any], device: str) -> Any:
    """A left-padded batch: token ids as built by prompts.Prompt where present, else the tokenized strings."""
    if all(getattr(p, "ids", None) for p in prompts):  # prompts.Prompt: ids with the summary as plain text
        return tokenizer.pad({"input_ids": [p.ids for p in prompts]}, padding=True, return_tensors="pt").to(device)
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def generations(tokenizer: Any, new: torch.Tensor, attention_mask: torch.Tensor, eos: set[int], latency_s: float,
                seconds: list[float] | None, margins: Callable[[int, int], list[float] | None]) -> list[Generation]:
    """One Generation per row of a batch's new tokens [B, T], cut after the first EOS and without padding.

    Args:
        seconds: each decoding step's time since the synced start (None: no per-token times, e.g. assisted decoding).
        margins: (row, n) -> that row's first n relative top-2 margins.
    """
    ttft, tpot = ttft_tpot(seconds or [])
    gap = timing_gap(latency_s, seconds or [])
    results = []
    for b, (row, mask) in enumerate(zip(new, attention_mask)):
        n = count_new_tokens(row, tokenizer.pad_token_id, eos)
        ids = row[:n].tolist()
        # a random-weight model keeps its architecture's vocabulary (e.g. Llama's 128,256) while borrowing a smaller
        # tokenizer: ids the tokenizer lacks are left out of the text (the token ids keep them)
        raw = tokenizer.decode([t for t in ids if t < len(tokenizer)], skip_special_tokens=True)
        results.append(Generation(clean_headline(raw), raw, int(mask.sum()), n, latency_s, ttft, tpot, token_ids=ids,
                                  margins=margins(b, n), timing_gap=gap))
    return results


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], device: str, per_token: bool = True, **gen_kwargs: Any) -> list[Generation]:
    """Greedy generation of one batch with transformers, timed end to end and per token.

    Args:
        model: a causal LM (possibly quantized, pruned, compiled).
        tokenizer: its tokenizer (left padding).
        prompts: the batch's prompt strings.
        device: where the inputs go and what to synchronize.
        per_token: record TTFT and time per token; False for assisted decoding, which lands several
            tokens per step, so per-step stamps are not per-token times there.
        gen_kwargs: generate() kwargs from the technique (use_cache, assistant_model, ...).
    """
    inputs = encode(tokenizer, prompts, device)  # input_ids: [B, S]
    vocab = getattr(model.get_output_embeddings(), "out_features", None)  # logits width (quantized heads keep it)
    timer, latency = TokenTimer(device, vocab), LatencyTracker(device)
    timer.reset()
    with latency.track(), torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, logits_processor=LogitsProcessorList([timer]),
            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, **gen_kwargs,
        )
    # out: [B, S + T]
    start = inputs["input_ids"].shape[1]
    eos = set(gen_kwargs.get("eos_token_id") or eos_ids(model))
    return generations(tokenizer, out[:, start:], inputs["attention_mask"], eos, latency.values[0],
                       timer.seconds() if per_token else None, lambda b, n: timer.margins(b, start, n))


def loop_generate(loop: Any, tokenizer: Any, prompts: list[str], device: str, max_new_tokens: int, stop_on_eos: bool,
                  eos: set[int]) -> list[Generation]:
    """Greedy generation of one batch with the compiled decode loop (backends/compiled_loop.py), timed like hf_generate:
    a clock mark per token (CUDA events on a GPU), margins copied to the host once per call."""
    inputs = encode(tokenizer, prompts, device)
    clock, latency = step_clock(device), LatencyTracker(device)
    clock.start()
    with latency.track():
        out = loop(inputs["input_ids"], inputs["attention_mask"], max_new_tokens, stop_on_eos, clock.mark)
    margins = out.margins.tolist()
    return generations(tokenizer, out.ids, inputs["attention_mask"], eos, latency.values[0], clock.seconds(),
                       lambda b, n: [float(f"{m:.6g}") for m in margins[b][:n]])


@torch.inference_mode()
def forced_logits(model: Any, sequences: list[list[int]], start: int, device: str) -> list[torch.Tensor]:
    """Teacher forcing: one forward pass over a row's sequences (right-padded into one batch, no cache, no generation).

    Returns:
        per sequence s, the logits [len(s) - start, V] at the positions predicting s[start:].
    """
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)  # [B, W]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=width - start + 1).logits  # [B, W - start + 1, V]
    return [logits[b, : len(s) - start] for b, s in enumerate(sequences)]


def forced_setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[Callable[[list[list[int]], int], list[torch.Tensor]], dict[str, Any]]:
    """The technique's model for teacher forcing (quality/teacher.py): its weights, dtype and transforms, run eagerly.
    A compiled or decode-loop technique's own kernels are not used: its fidelity is that of its weights and dtype."""
    model, _, info = build_model(cfg, device)
    eager = [k for k in ("compile", "decode_loop") if getattr(cfg, k)]
    facts = {"engine": "transformers", "dtype": str(model.dtype).replace("torch.", ""), "random_weights": info["random_weights"]}
    if eager:
        facts["note"] = f"eager forward of the technique's model: its {' and '.join(eager)} kernels are not in the measure"
    return lambda sequences, start: forced_logits(model, sequences, start, device), facts


def configure_draft(draft: Any, settings: Speculative) -> dict[str, Any]:
    """Put the speculative settings where transformers reads them: the draft's own generation config.

    `num_assistant_tokens` passed to the target's generate() is ignored: the candidate generator copies the
    draft's generation_config (defaults: 20 tokens, a 0.4 confidence cut-off). The schema's constant schedule
    keeps the draft length from drifting across calls (the heuristic one carries state from warm-up into timed
    rows); a setting left at None keeps the draft's own value.

    Returns:
        the settings in effect, as the draft's config now holds them (recorded in perf.json).
    """
    config = draft.generation_config
    for key, value in settings.model_dump(exclude_none=True).items():
        setattr(config, key, value)
    return {key: getattr(config, key, None) for key in type(settings).model_fields}


def setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """Load the technique's model(s) and bind hf_generate to them and to its generate kwargs.

    Returns:
        the bound generate function, the tokenizer (for prompts) and load facts; `info["after_run"]`
        gives the numbers only known after the timed run (acceptance rate).
    """
    from headline_bench.measure.roofline import embedding_read
    from headline_bench.measure.weights import weight_bytes

    model, tokenizer, info = build_model(cfg, device)
    info["weight_mb"] = weight_bytes(model) / 2**20
    info.update(embedding_read(model))  # the MBU's bytes per step leave out an untied embedding but one row
    info.update(embedding_read(model))  # the MBU's bytes per step leave out an untied embedding but one row
    info.update(getattr(model, "compression_facts", {}))
    if info.get("random_weights"):
        # Random weights never write a meaningful newline or EOS: a fixed output length (vLLM's --ignore-eos,
        # optimum-benchmark's min_new_tokens == max_new_tokens) makes every technique do the same work.
        n = cfg.generate.max_new_tokens
        gen_kwargs = {**cfg.generate.kwargs(), "min_new_tokens": n, "eos_token_id": sorted(eos_ids(model))}
    else:
        # Stop at the end of the first line. Newline tokens join the EOS ids rather than using `stop_strings`,
        # which assisted generation forwards to the draft without a tokenizer (and then fails).
        gen_kwargs = {**cfg.generate.kwargs(), "eos_token_id": sorted(eos_ids(model) | newline_ids(tokenizer))}
    if cfg.compile:
        from transformers import CompileConfig

        settings = cfg.compile.model_dump()
        if isinstance(settings["mode"], dict):  # {cpu: default, cuda: reduce-overhead}: CUDA graphs only on GPUs
            settings["mode"] = settings["mode"]["cuda" if device.startswith("cuda") else "cpu"]
        compile_config = CompileConfig(**settings)
        compile_config._compile_all_devices = device == "cpu"  # generate() compiles on GPUs only unless told
        gen_kwargs["compile_config"] = compile_config
        info["compile_mode"] = settings["mode"]
        info["inductor_options"] = compile_options(settings["backend"], settings["mode"], settings["options"])
    acceptance = AcceptanceTracker()
    if cfg.speculative:
        draft_cfg = cfg.model_copy(update={"model_name": params.base.model, "quantize": None, "prune": None, "parallel": None, "device_map": None})
        draft, draft_tok, _ = build_model(draft_cfg, device)
        info["speculative_used"] = configure_draft(draft, cfg.speculative)
        gen_kwargs["assistant_model"] = draft
        if draft_tok.get_vocab() != tokenizer.get_vocab():
            gen_kwargs["assistant_tokenizer"] = draft_tok  # universal assisted decoding
            info["universal_assisted"] = True
        info["draft_weight_mb"] = weight_bytes(draft) / 2**20
    assisted = bool(cfg.speculative or cfg.generate.prompt_lookup_num_tokens)
    if assisted:
        acceptance.attach(model)
    info["after_warmup"] = acceptance.reset  # acceptance over the timed rows only
    info["after_run"] = lambda: {"acceptance_rate": acceptance.rate(), "draft_tokens_proposed": acceptance.proposed,
                                 "draft_tokens_accepted": acceptance.accepted} if acceptance.attached else {}
    info["dtype"] = str(getattr(model, "dtype", cfg.dtype)).replace("torch.", "")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 10**9)
    info["max_input_tokens"] = min(params.generate.max_input_tokens, context - cfg.generate.max_new_tokens)

    if cfg.decode_loop:
        generate_fn, loop = loop_setup(model, tokenizer, cfg, gen_kwargs, device)
        info |= loop_facts(cfg, device) | {"inductor_options": compile_options("inductor", None, loop.compile_options)}
        info["decode_loop"]["step"] = "fused" if loop.fused is not None else "model"  # backends/fused_llama.py or the model's forward
        info["before_warmup"] = prewarm(loop, generate_fn, tokenizer, cfg.batch_size, device, gen_kwargs["max_new_tokens"], info)
        return generate_fn, tokenizer, info

    def generate_fn(prompts: list[str]) -> list[Generation]:
        before = (acceptance.proposed, acceptance.accepted)
        gens = hf_generate(model, tokenizer, prompts, device, per_token=not assisted, **gen_kwargs)
        if acceptance.attached and len(gens) == 1:  # assisted decoding runs one row per call
            gens[0].draft_proposed, gens[0].draft_accepted = acceptance.proposed - before[0], acceptance.accepted - before[1]
        return gens

    return generate_fn, tokenizer, info


def loop_mode(cfg: ResolvedTechnique, device: str) -> str:
    """The decode loop's torch.compile mode on this device kind (a dict in params picks by cpu / cuda)."""
    mode = cfg.decode_loop.mode if cfg.decode_loop else {"cpu": "default", "cuda": "reduce-overhead"}
    return mode["cuda" if device.startswith("cuda") else "cpu"] if isinstance(mode, dict) else mode


def loop_facts(cfg: ResolvedTechnique, device: str) -> dict[str, Any]:
    """What perf.json records about the decode loop: its compile mode and knobs."""
    knobs = cfg.decode_loop.model_dump(mode="json") if cfg.decode_loop else {}
    return {"decode_loop": {**knobs, "mode": loop_mode(cfg, device)}, "compile_mode": loop_mode(cfg, device)}


def compile_options(backend: str, mode: str | None, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """perf.json's inductor_options: the process-wide options with the mode's and the given ones on top (None for
    another backend)."""
    if backend != "inductor":
        return None
    from torch._inductor import list_mode_options

    from headline_bench.backends.compiled_loop import inductor_options

    return inductor_options({**(list_mode_options(mode) if mode else {}), **(options or {})})


def loop_setup(model: Any, tokenizer: Any, cfg: ResolvedTechnique, gen_kwargs: dict[str, Any], device: str) -> tuple[GenerateFn, Any]:
    """Bind the compiled decode loop (backends/compiled_loop.py) to the model: same stop ids and output length as
    generate() would use, fixed length (no stop check at all) when min_new_tokens reaches max_new_tokens.

    Returns:
        the generate function and the DecodeLoop behind it."""
    from headline_bench.backends.compiled_loop import DecodeLoop, apply_inductor
    from headline_bench.settings import DecodeLoop as LoopSettings

    settings = cfg.decode_loop or LoopSettings()
    clash = [k for k in ("compile", "speculative", "parallel", "device_map") if getattr(cfg, k)]
    if clash or gen_kwargs.get("prompt_lookup_num_tokens") or cfg.generate.use_cache is False:
        raise InputError(f"{cfg.name}: decode_loop runs its own greedy loop with a static cache; it does not combine "
                         f"with {clash or ['prompt lookup / use_cache: false']}")
    apply_inductor(settings.inductor)
    loop = DecodeLoop(model, set(gen_kwargs["eos_token_id"]), tokenizer.pad_token_id, loop_mode(cfg, device), settings.bucket,
                      module_guards=settings.module_guards, attention=settings.attention, step=settings.step)
    n = gen_kwargs["max_new_tokens"]
    fixed = gen_kwargs.get("min_new_tokens", 0) >= n
    eos = set(gen_kwargs["eos_token_id"])
    return lambda prompts: loop_generate(loop, tokenizer, prompts, device, n, not fixed, eos), loop


def prewarm(loop: Any, generate_fn: GenerateFn, tokenizer: Any, batch_size: int, device: str, max_new_tokens: int,
            facts: dict[str, Any]) -> Callable[[list[Any]], None]:
    """A hook for before the warm-up: one untimed call per cache shape the run will need (one compile each), so that
    no prompt of the timed run lands in a bucket that has not been compiled yet. Records the shapes and seconds."""
    import time

    def warm(prompts: list[Any]) -> None:
        start, seen = time.perf_counter(), {}
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            shape = loop.shape(encode(tokenizer, batch, device)["input_ids"], max_new_tokens)
            if shape not in seen:
                seen[shape] = batch
        for batch in seen.values():
            generate_fn(batch)
        facts["decode_loop"]["compiled_shapes"] = [list(k) for k in seen]  # (batch, cache slots, steps)
        facts["compile_s"] = round(time.perf_counter() - start, 2)  # compiling, plus one untimed call per shape
    return warm


def server(entry: ServingEntry, params: Params, port: int, device: str, host: str) -> ServerSpec:
    """`transformers serve` pinned to the converted checkpoint; --continuous-batching and --compile are knobs."""
    import torch

    path = model_path(entry.model)
    dtype, seed = entry.dtype or params.base.dtype, params.base.seed
    model = path
    if need := missing("fastapi", "uvicorn", "openai", "pydantic"):
        raise Skip(f"transformers serve needs {', '.join(need)}: pip install -r requirements.txt")
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model), "--host", host, "--port", str(port),
            "--device", device, "--dtype", dtype, "--default-seed", str(seed), "--log-level", "info"]
    argv += ["--continuous-batching"] if entry.continuous_batching else []
    argv += ["--compile"] if entry.compile else []
    for key, value in (entry.cb.model_dump(exclude_none=True) if entry.cb else {}).items():  # --cb-num-blocks 16, --cb-use-cuda-graph, ...
        flag = f"cb-{key.replace('_', '-')}"
        argv += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    threads = entry.threads or torch.get_num_threads()
    return ServerSpec(argv, "/health", str(path), threads, {"model_path": str(path), "dtype": dtype}, token_prompts=False, text_ids=serve_tokenize(path))


def serve_tokenize(path: Any) -> Callable[[str], list[int]]:
    """The ids `transformers serve` makes of a completions prompt: its `tokenizer(prompt)` parses special tokens and
    adds the tokenizer's BOS/EOS (transformers/cli/serving/completion.py). It takes only text (a list is HTTP 400)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return lambda text: tokenizer(text)["input_ids"]
