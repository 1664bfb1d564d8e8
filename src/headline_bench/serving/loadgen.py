"""Load generator for OpenAI-compatible servers: streamed completions, open-loop Poisson arrivals or a fixed
number of requests in flight, every request timed from the client's side.

Each request is POSTed to `/v1/completions` with `stream: true`, and every server-sent event that carries
text is stamped on arrival. The client stops reading at the first newline (the task's stop), so engines that
ignore `stop` (transformers' continuous batching) are timed to the same point; the headline is the text up to
there. Output tokens are the text chunks received, one per decode step on these servers. Errors and time-outs
are recorded with the request, never dropped; so is a stream that ends without a finish_reason (cut short). A stream
that finishes without text (an engine that honours the stop before any output) is an empty headline, not an error:
goodput counts it as a miss, as it does a headline that cleans to nothing. Only localhost is ever addressed."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from headline_bench.data.prompts import clean_headline
from headline_bench.serving.goodput import tpot


@dataclass
class RequestResult:
    index: int                      # position in the level's request order (the row is index mod rows)
    sent_s: float                   # send time since the level started
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0                 # text chunks received
    usage_tokens: int | None = None  # completion_tokens when the server reported them before the stream ended
    prompt_tokens: int | None = None
    text: str = ""
    headline: str = ""              # the text cleaned as offline (clean_headline): empty when the answer holds no headline
    finish_reason: str | None = None
    error: str | None = None
    timed_out: bool = False
    token_ids: list[int] | None = None   # generated ids, where the server's logprobs name them (up to the stop)
    logprob_gaps: list[float | None] = field(default_factory=list)  # top1 - top2 logprob per token, where top_logprobs >= 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poisson_arrivals(rate: float, n: int, seed: int | tuple[int, ...], max_duration_s: float) -> list[float]:
    """Send times (s from the level's start) of at most `n` requests arriving as a Poisson process.

    Gaps are exponential with mean 1/rate from a generator seeded by (seed, rate), so every engine sees the
    same schedule at the same rate; a tuple seed (base seed, run) gives each independent run its own schedule.
    Arrivals after `max_duration_s` are not sent.
    """
    rng = np.random.default_rng([*(seed if isinstance(seed, tuple) else (seed,)), round(rate * 1000)])
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [float(t) for t in times if t <= max_duration_s]


def parse_event(line: bytes) -> dict[str, Any] | str | None:
    """One SSE line -> its JSON payload, "[DONE]", or None for comments, blank lines and other fields."""
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    return data if data == "[DONE]" else json.loads(data)


def chunk_text(event: dict[str, Any]) -> str:
    """Text of a completions chunk (choices[0].text) or a chat chunk (choices[0].delta.content)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


def token_logprobs(event: dict[str, Any]) -> list[tuple[int | None, float | None]]:
    """(token id, top1 - top2 logprob) of each token a chunk's logprobs describe: OpenAI's completions form (`tokens`,
    `top_logprobs`; vLLM names ids as "token_id:N" with return_tokens_as_token_ids) or llama-server's (`content` entries
    with `id` and `top_logprobs`). The gap of two logprobs equals the gap of the two logits."""
    lp = ((event.get("choices") or [{}])[0] or {}).get("logprobs") or {}

    def gap(values: list[float | None]) -> float | None:
        top = sorted((v for v in values if v is not None), reverse=True)
        return top[0] - top[1] if len(top) >= 2 else None

    if lp.get("content") is not None:
        return [(c.get("id"), gap([t.get("logprob") for t in c.get("top_logprobs") or []])) for c in lp["content"]]
    tops = lp.get("top_logprobs") or []
    out = []
    for i, tok in enumerate(lp.get("tokens") or []):
        tid = int(tok.split(":", 1)[1]) if isinstance(tok, str) and tok.startswith("token_id:") else None
        out.append((tid, gap(list((tops[i] or {}).values())) if i < len(tops) else None))
    return out


async def stream_request(session: Any, url: str, payload: dict[str, Any], timeout_s: float, index: int, t0: float,
                         stop: str | None = "\n", drain: bool = False) -> RequestResult:
    """Send one streamed completion and time it from the client's side.

    Args:
        session: an aiohttp.ClientSession.
        url: the completions endpoint.
        payload: the request body (stream is forced on).
        timeout_s: the whole request's limit; past it the request is a time-out.
        index: the request's position in its level.
        t0: the level's start (perf_counter), for `sent_s`.
        stop: stop reading once the text holds this; None reads to the end of the stream.
        drain: after the stop, read the rest of the stream for the server's usage report only (the quality pass:
            the server's prompt-token count of every row); text, stamps and logprobs end at the stop.
    """
    start = time.perf_counter()
    res = RequestResult(index=index, sent_s=start - t0)
    stamps: list[float] = []
    tokens: list[tuple[int | None, float | None]] = []
    stopped = False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json={**payload, "stream": True}) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return res
                async for line in resp.content:
                    event = parse_event(line)
                    if event is None:
                        continue
                    if event == "[DONE]":
                        break
                    if event.get("error"):
                        res.error = f"stream error: {str(event['error'])[:200]}"
                        break
                    usage = event.get("usage") or {}
                    res.usage_tokens = usage.get("completion_tokens", res.usage_tokens)
                    res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
                    res.finish_reason = next((c.get("finish_reason") for c in event.get("choices") or [] if c.get("finish_reason")), res.finish_reason)
                    text = chunk_text(event)
                    if stopped:
                        continue
                    tokens += token_logprobs(event)
                    if text:
                        stamps.append(time.perf_counter())
                        res.text += text
                        if stop and stop in text:
                            res.finish_reason = res.finish_reason or "client stop"
                            stopped = True
                            if not drain:
                                break
    except TimeoutError:
        res.error, res.timed_out = f"timed out after {timeout_s:g} s", True
    except Exception as e:  # connection refused or reset, bad JSON: recorded with the request
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    if res.error is None and res.finish_reason is None:  # e.g. llama-cpp-python cutting a stream when the next request arrives
        res.error = "stream ended without a finish_reason (cut short)"
    res.headline = clean_headline(res.text)
    if res.error is None and not stamps:  # finished with no text: an empty headline, timed to the stream's end
        res.e2e_s = time.perf_counter() - start
    if stamps:
        res.ttft_s, res.e2e_s = stamps[0] - start, stamps[-1] - start
        res.itl_s = [b - a for a, b in zip(stamps, stamps[1:])]
        res.tokens = len(stamps)
        res.tpot_s = tpot(res.e2e_s, res.ttft_s, res.tokens)
    if tokens:
        ids = [t for t, _ in tokens]
        res.token_ids = None if None in ids else ids  # type: ignore[assignment]
        res.logprob_gaps = [g for _, g in tokens]
    return res


def new_session(timeout_s: float) -> Any:
    import aiohttp

    # trust_env=False: never route localhost through a proxy from the environment. force_close: each request on its own
    # connection (a loopback connect costs well under a millisecond): llama-server's HTTP library closes kept-alive
    # connections on its own schedule, and a request sent on one it had just closed failed with "Can not write request
    # body" (42 of 100 served quality requests on a loaded 2-core machine, 2026-12-06), a client artefact, not the server's
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s + 5), trust_env=False,
                                 connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def run_rate(url: str, payloads: list[dict[str, Any]], rate: float, n: int, seed: int | tuple[int, ...], max_duration_s: float,
                   timeout_s: float) -> tuple[list[RequestResult], float]:
    """Open loop: requests leave on a seeded Poisson schedule whether or not earlier ones have finished.

    Returns:
        the results in send order and the wall time from the level's start to the last request's end.
    """
    schedule = poisson_arrivals(rate, n, seed, max_duration_s)
    async with new_session(timeout_s) as session:
        t0 = time.perf_counter()

        async def one(i: int, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            return await stream_request(session, url, payloads[i % len(payloads)], timeout_s, i, t0)

        results = await asyncio.gather(*(one(i, at) for i, at in enumerate(schedule)))
        return list(results), time.perf_counter() - t0


async def run_concurrency(url: str, payloads: list[dict[str, Any]], concurrency: int, n: int, max_duration_s: float,
                          timeout_s: float, stop: str | None = "\n", drain: bool = False) -> tuple[list[RequestResult], float]:
    """Closed loop: `concurrency` workers each send the next request as soon as their previous one ends,
    until `n` requests were sent or `max_duration_s` has passed. `stop=None` reads every stream to its end
    (warm-up: the server's usage report then arrives); `drain` keeps reading after the stop for that report only."""
    async with new_session(timeout_s) as session:
        t0 = time.perf_counter()
        results: list[RequestResult] = []
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() - t0 > max_duration_s:
                    return
                results.append(await stream_request(session, url, payloads[i % len(payloads)], timeout_s, i, t0, stop, drain))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sorted(results, key=lambda r: r.index), time.perf_counter() - t0
