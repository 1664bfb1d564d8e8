"""Backends: every one takes prompts and returns one Generation per prompt, timed the same way.

The generate stage picks the backend that the technique names; backends know nothing about techniques.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from prompts import clean_headline
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


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], device: str, **gen_kwargs: Any) -> list[Generation]:
    """Greedy generation of one batch with transformers, timed end to end and per token.

    Args:
        model: a causal LM (possibly quantized, pruned, compiled).
        tokenizer: its tokenizer (left padding).
        prompts: the batch's prompt strings.
        device: where the inputs go and what to synchronize.
        gen_kwargs: generate() kwargs from the technique (use_cache, assistant_model, ...).
    """
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    # input_ids: [B, S]
    timer, latency = TokenTimer(device), LatencyTracker(device)
    timer.reset()
    with latency.track(), torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, logits_processor=LogitsProcessorList([timer]),
            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, **gen_kwargs,
        )
    # out: [B, S + T]
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = eos_ids(model)
    results = []
    for row, mask in zip(new, inputs["attention_mask"]):
        n = count_new_tokens(row, tokenizer.pad_token_id, eos)
        raw = tokenizer.decode(row[:n], skip_special_tokens=True)
        results.append(Generation(clean_headline(raw), raw, int(mask.sum()), n, latency.values[0], timer.ttft(), timer.tpot()))
    return results


def llamacpp_generate(llm: Any, prompts: list[str], max_new_tokens: int, **_: Any) -> list[Generation]:
    """Greedy generation with llama.cpp, one prompt at a time, each from a cold cache.

    llama.cpp reuses the previous prompt's KV cache when prompts share a prefix, which flatters it;
    resetting per prompt measures what a fresh request costs, like the transformers backends.
    """
    results = []
    for prompt in prompts:
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        start = time.perf_counter()
        first = None
        pieces, n = [], 0
        for chunk in llm(tokens, max_tokens=max_new_tokens, temperature=0.0, top_k=1, stop=["\n"], stream=True):
            if first is None:
                first = time.perf_counter()
            pieces.append(chunk["choices"][0]["text"])
            n += 1
        end = time.perf_counter()
        raw = "".join(pieces)
        tpot = (end - first) / (n - 1) if first is not None and n > 1 else None
        results.append(Generation(clean_headline(raw), raw, len(tokens), n, end - start, (first or end) - start, tpot))
    return results
