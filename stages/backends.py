"""Backends: every one takes prompts and returns one Generation per prompt, timed the same way.

The generate stage picks the backend that the technique names; backends know nothing about techniques.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from prompts import clean_headline, safe_ids
from trackers import LatencyTracker, TokenTimer


@dataclass
class Generation:
    prediction: str
    raw: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float
    ttft_s: float | None
    tpot_s: float | None
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token included, padding not
    margins: list[float] | None = None  # per generated token: relative top-2 logit margin (trackers.TokenTimer)
    draft_proposed: int | None = None  # assisted decoding: draft tokens proposed / accepted for this row
    draft_accepted: int | None = None
    latency_s_passes: list[float] | None = None  # with generate.repeats > 1: this row's latency in each timed pass


def count_new_tokens(new_ids: torch.Tensor, pad_id: int | None, eos_ids: set[int]) -> int:
    """Tokens actually generated in one row: up to and including the first EOS, without padding.

    Args:
        new_ids: [T] the generated part of one row of a batch.
    """
    ids = new_ids.tolist()
    for i, t in enumerate(ids):
        if t in eos_ids:
            return i + 1
    while ids and pad_id is not None and ids[-1] == pad_id:
        ids.pop()
    return len(ids)


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


def llamacpp_generate(llm: Any, prompts: list[str], max_new_tokens: int, stop: str = "\n", **_: Any) -> list[Generation]:
    """Greedy generation with llama.cpp, one prompt at a time, each from a cold KV cache.

    llama.cpp reuses the previous prompt's KV cache when prompts share a prefix (our chat template
    does), which flatters it; `reset()` per prompt measures what a fresh request costs, like the
    transformers backends. Tokens come from the low-level generator, so counts are exact ids, not
    stream chunks, and every sampled token (the one holding the newline or EOS included) counts,
    as in hf_generate.

    Args:
        llm: a llama_cpp.Llama.
        prompts: full prompt strings (chat template already applied).
        max_new_tokens: cap on sampled tokens.
        stop: stop after the token whose text contains this (the HF path's stop_strings).
    """
    from llama_cpp import llama_vocab_is_eog

    vocab = llm._model.vocab  # the end-of-generation test create_completion uses; EOS alone misses <|im_end|>-style ids

    def tokenize(text: str, special: bool) -> list[int]:  # the summary (special=False) is plain text to llama.cpp too
        return llm.tokenize(text.encode(), add_bos=False, special=special)

    results = []
    for prompt in prompts:
        llm.reset()
        tokens = safe_ids(getattr(prompt, "parts", [(prompt, True)]), tokenize, getattr(prompt, "controls", ()))
        ids: list[int] = []
        stamps: list[float] = []
        start = time.perf_counter()
        for tok in llm.generate(list(tokens), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            ids.append(tok)
            if llama_vocab_is_eog(vocab, tok) or stop in llm.detokenize([tok]).decode("utf-8", "ignore") or len(ids) >= max_new_tokens:
                break
        end = time.perf_counter()
        raw = llm.detokenize([t for t in ids if not llama_vocab_is_eog(vocab, t)]).decode("utf-8", "ignore")
        tpot = (stamps[-1] - stamps[0]) / (len(ids) - 1) if len(ids) > 1 else None
        ttft = stamps[0] - start if stamps else None
        results.append(Generation(clean_headline(raw), raw, len(tokens), len(ids), end - start, ttft, tpot, token_ids=list(ids)))
    return results
