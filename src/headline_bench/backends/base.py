"""What every engine returns for one prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ServerSpec:
    """How to start an engine's OpenAI-compatible server: the command, the health path that answers once the model
    is loaded, the model name requests carry, its thread count and the facts serve.json records.

    How its prompts reach it, so that served prompts equal offline prompts by token ids: `prompt_ids` gives a
    prompt's offline ids for this engine (None: the transformers ids the generate stage built, Prompt.ids).
    With `token_prompts` the server takes those ids as the request's `prompt`; otherwise it takes text, and
    `text_ids` says which ids the server makes of a text (special tokens parsed, BOS as it adds it), so that rows
    whose text re-tokenizes differently are found and marked.
    """

    argv: list[str]
    health_path: str
    model_name: str
    threads: int
    info: dict[str, Any] = field(default_factory=dict)
    token_prompts: bool = False
    prompt_ids: Callable[[Any], list[int]] | None = None
    text_ids: Callable[[str], list[int]] | None = None


def missing(*modules: str) -> list[str]:
    """The modules of `modules` that are not installed."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


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
    latency_s_processes: list[float] | None = None  # with generate.processes > 1: this row's latency in each timed process
    timing_gap: float | None = None  # |latency - (TTFT + (n-1) x TPOT)| / latency of this row's call (trackers.timing_gap)


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


GenerateFn = Callable[[list[str]], list[Generation]]
