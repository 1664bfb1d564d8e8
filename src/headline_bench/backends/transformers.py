"""The transformers engine: offline generation through generate(), and `transformers serve`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList

from headline_bench.backends.base import GenerateFn, Generation, ServerSpec, count_new_tokens, missing
from headline_bench.data.prompts import clean_headline
from headline_bench.errors import Skip
from headline_bench.measure.trackers import (
    AcceptanceTracker,
    LatencyTracker,
    TokenTimer,
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
    if all(getattr(p, "ids", None) for p in prompts):  # prompts.Prompt: ids with the summary as plain text
        inputs = tokenizer.pad({"input_ids": [p.ids for p in prompts]}, padding=True, return_tensors="pt").to(device)
    else:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    # input_ids: [B, S]
    vocab = getattr(model.get_output_embeddings(), "out_features", None)  # logits width (quantized heads keep it)
    timer, latency = TokenTimer(device, vocab), LatencyTracker(device)
    timer.reset()
    with latency.track(), torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, logits_processor=LogitsProcessorList([timer]),
            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, **gen_kwargs,
        )
    # out: [B, S + T]
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = set(gen_kwargs.get("eos_token_id") or eos_ids(model))
    results = []
    start = inputs["input_ids"].shape[1]
    for b, (row, mask) in enumerate(zip(new, inputs["attention_mask"])):
        n = count_new_tokens(row, tokenizer.pad_token_id, eos)
        ids = row[:n].tolist()
        # a random-weight model keeps its architecture's vocabulary (e.g. Llama's 128,256) while borrowing a smaller
        # tokenizer: ids the tokenizer lacks are left out of the text (the token ids keep them)
        raw = tokenizer.decode([t for t in ids if t < len(tokenizer)], skip_special_tokens=True)
        ttft, tpot = (timer.ttft(), timer.tpot()) if per_token else (None, None)
        results.append(Generation(clean_headline(raw), raw, int(mask.sum()), n, latency.values[0], ttft, tpot,
                                  token_ids=row[:n].tolist(), margins=timer.margins(b, start, n)))
    return results


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
    from headline_bench.measure.weights import weight_bytes

    model, tokenizer, info = build_model(cfg, device)
    info["weight_mb"] = weight_bytes(model) / 2**20
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

    def generate_fn(prompts: list[str]) -> list[Generation]:
        before = (acceptance.proposed, acceptance.accepted)
        gens = hf_generate(model, tokenizer, prompts, device, per_token=not assisted, **gen_kwargs)
        if acceptance.attached and len(gens) == 1:  # assisted decoding runs one row per call
            gens[0].draft_proposed, gens[0].draft_accepted = acceptance.proposed - before[0], acceptance.accepted - before[1]
        return gens

    return generate_fn, tokenizer, info


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
