"""Serve one entry under load and measure it (the serve stage's work)."""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path
from typing import Any

from headline_bench.errors import InputError, Skip
from headline_bench.files import GENERATIONS, SERVING_METRICS, read_jsonl
from headline_bench.logs import log
from headline_bench.measure.environment import env_info
from headline_bench.serving.goodput import level_summary, next_rate, sustainable_rate
from headline_bench.serving.loadgen import RequestResult, run_concurrency, run_rate
from headline_bench.serving.server import HOST, Server, ServerError, free_port
from headline_bench.settings import Params, Serve, ServingEntry


def resolve_entry(params: Params, name: str) -> ServingEntry:
    """The entry's settings, with the model defaulting to base.model; an unknown entry (a command-line argument) is an InputError."""
    if name not in params.serving:
        raise InputError(f"unknown serving entry '{name}'; params.yaml serving: defines {', '.join(params.serving) or 'none'}")
    entry = params.serving[name]
    return entry if entry.model else entry.model_copy(update={"model": params.base.model})


def recorded(entry: ServingEntry) -> dict[str, Any]:
    """What serve.json keeps under "config": the model, then the keys params.yaml set (the report's knobs)."""
    return {"model": entry.model, **entry.model_dump(mode="json", exclude_unset=True)}


def server_for(entry: ServingEntry, params: Params, log_path: Path) -> tuple[Server, str, dict[str, Any]]:
    """The entry's Server (not started), the model name its requests carry, and facts for serve.json. Skip when it cannot run here."""
    from headline_bench.backends import engine
    from headline_bench.techniques.config import pick_device

    device, port = pick_device(params.base.device), free_port()
    spec = engine(entry.engine).server(entry, params, port, device, HOST)
    info: dict[str, Any] = {"engine": entry.engine, "device": device, "port": port, **spec.info, "argv": spec.argv}
    return Server(spec.argv, port, spec.health_path, log_path, env={"OMP_NUM_THREADS": str(spec.threads)}), spec.model_name, info


def payloads_for(rows: list[dict[str, Any]], params: Params, entry: ServingEntry, model_name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Request bodies for the rows: the generate stage's prompts, greedy, newline stop, generate.max_new_tokens,
    plus the entry's `request` fields (engine-specific: llama-cpp-python's server applies repeat_penalty 1.1
    unless the request says otherwise).

    Returns:
        the bodies, the rows kept (prompts over generate.max_input_tokens are left out, as offline) and each
        prompt's offline token count (to check the server tokenized the same text to as many tokens).
    """
    from transformers import AutoTokenizer

    from headline_bench.data.prompts import prompts_for
    from headline_bench.models.ref import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path(entry.model))
    prompts, kept, _ = prompts_for(rows, tokenizer, params.prompt, params.generate.max_input_tokens)
    counts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    body = {"model": model_name, "max_tokens": params.generate.max_new_tokens, "temperature": 0.0, "stop": ["\n"], **entry.request}
    return [body | {"prompt": p} for p in prompts], kept, counts


def measure(server: Server, payloads: list[dict[str, Any]], s: Serve, seed: int, levels: list[dict[str, Any]],
            requests: list[tuple[str, RequestResult]], warm: list[RequestResult]) -> None:
    """Warm up (streams read to their end, so the server's token usage arrives), then measure the rates of
    s.rates from low to high until one is overloaded (goodput share below s.overload_share), up to
    s.search_steps bisecting rates, and every concurrency level, appending to `levels` and `requests` as it
    goes (so a failure keeps what was measured).

    Args:
        server: a started server.
        payloads: request bodies, cycled in order.
        s: params `serve`.
        seed: base.seed, for the arrival schedules.
        levels / requests / warm: filled in place.
    """
    url = server.url + "/v1/completions"
    n, span, timeout, slo = s.requests, s.max_duration_s, s.timeout_s, s.slo.model_dump()
    warm += asyncio.run(run_concurrency(url, payloads, 1, s.warmup_requests, span, timeout, stop=None))[0]
    if warm and all(r.error for r in warm):
        raise ServerError(f"every warm-up request failed: {warm[0].error}")

    def level(kind: str, value: float) -> None:
        label = f"{kind} {value:g}"
        run = run_rate(url, payloads, value, n, seed, span, timeout) if kind == "rate" else run_concurrency(url, payloads, int(value), n, span, timeout)
        results, wall = asyncio.run(run)
        summary = level_summary([r.to_dict() for r in results], wall, slo)
        levels.append({"level": label, "kind": kind, kind: value, **summary})
        requests.extend((label, r) for r in results)
        log.info("%s: %d/%d ok, %d good, TTFT p50 %s s, goodput share %s", label, summary["ok"], summary["sent"], summary["good"],
                 f"{summary['ttft_s'].get('p50', float('nan')):.3f}", f"{summary['goodput_share']:.2f}" if summary["sent"] else "—")
        if not server.alive():
            raise ServerError(f"server exited with code {server.proc.returncode} during {label}: {server.log_tail()}")

    for rate in sorted(s.rates):
        level("rate", rate)
        if levels[-1]["goodput_share"] is not None and levels[-1]["goodput_share"] < s.overload_share:
            break  # overloaded: higher rates only queue longer, and the pass/fail bracket is found
    for _ in range(s.search_steps):
        rate = next_rate(levels, s.slo.share, s.search_min_gap)
        if rate is None or any(lv.get("rate") == rate for lv in levels):
            break
        level("rate", round(rate, 3))
    for c in s.concurrency:
        level("concurrency", c)


def quality(records: list[dict[str, Any]], offline: list[dict[str, Any]] | None, seed: int) -> dict[str, Any]:
    """ROUGE of every served headline (score.rouge: the same metric module) and how many equal the offline greedy headline of the row."""
    from headline_bench.quality.rouge import rouge

    served = [r for r in records if r.get("prediction") is not None]
    if not served:
        return {"served": 0}
    out: dict[str, Any] = {"served": len(served), **{k: float(v) for k, v in rouge([r["prediction"] for r in served], [r["reference"] for r in served], seed).items()}}
    per_row: dict[Any, set[str]] = {}
    for r in served:
        per_row.setdefault(r["id"], set()).add(r["prediction"])
    out["rows_with_varying_headlines"] = sum(len(v) > 1 for v in per_row.values())
    if offline is not None:
        ref = {r["id"]: r["prediction"] for r in offline if r.get("prediction") is not None}
        pairs = [(r, ref[r["id"]]) for r in served if r["id"] in ref]
        same = sum(r["prediction"] == p for r, p in pairs)
        by_level: dict[str, list[int]] = {}
        for r, p in pairs:
            by_level.setdefault(r["level"], [0, 0])[0] += r["prediction"] == p
            by_level[r["level"]][1] += 1
        first = next(({"id": r["id"], "level": r["level"], "served": r["prediction"], "offline": p} for r, p in pairs if r["prediction"] != p), None)
        out |= {"identical_to_offline": same, "compared_to_offline": len(pairs), "identical_by_level": by_level, "first_difference": first}
    return out


def serve(name: str, entry: ServingEntry, params: Params, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one serving entry end to end. Returns serve.json's content and the per-request records.

    A machine that cannot run the entry gives {"skipped": reason}; a server that fails to start or dies gives
    {"failed": ..., "traceback": [...]} with the levels measured before it. The server is stopped either way.
    """
    from headline_bench.data.prompts import clean_headline

    s, seed = params.serve, params.base.seed
    if s is None:
        raise InputError("params.yaml: serve: missing (serving needs it)")
    out: dict[str, Any] = {"entry": name, "config": recorded(entry), "env": env_info(), "load": s.model_dump(exclude={"slo"}), "slo": s.slo.model_dump(),
                           "prompt_mode": "/v1/completions with the offline prompt text (chat template applied by the client)"}
    levels: list[dict[str, Any]] = []
    timed: list[tuple[str, RequestResult]] = []
    warm: list[RequestResult] = []
    kept: list[dict[str, Any]] = []
    counts: list[int] = []
    try:
        server, model_name, info = server_for(entry, params, SERVING_METRICS / name / "server.log")
        out["server"] = info
        payloads, kept, counts = payloads_for(rows, params, entry, model_name)
        with server:
            server.start(s.startup_timeout_s)
            out["server"]["startup_s"] = server.startup_s
            log.info("%s: %s ready on port %d after %.1f s", name, entry.engine, server.port, server.startup_s)
            measure(server, payloads, s, seed, levels, timed, warm)
            out["server"]["exit_code"] = server.stop()
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return out | {"skipped": str(e)}, []
    except InputError:
        raise  # bad params or inputs (unconverted model): a one-line error, not a recorded failure
    except Exception as e:  # a server that would not start or died, or anything unexpected: recorded, the pipeline goes on
        log.error("%s: failed: %s", name, e)
        out |= {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "traceback": traceback.format_exc().splitlines()[-6:]}
    records = []
    for label, r in timed:
        row = kept[r.index % len(kept)]
        records.append({"id": row["id"], "reference": row["reference"], "level": label, "prediction": None if r.error else clean_headline(r.text),
                        "raw": r.text, "offline_prompt_tokens": counts[r.index % len(kept)], **{k: v for k, v in r.to_dict().items() if k != "text"}})
    reported = [(r, counts[r.index % len(counts)]) for r in warm if r.prompt_tokens is not None]
    reference = GENERATIONS / f"{entry.reference}.jsonl"
    offline = read_jsonl(reference) if entry.reference and reference.exists() else None
    out |= {"samples": len(kept), "levels": levels, "sustainable_rate": sustainable_rate(levels, s.slo.share),
            "prompt_tokens_match": [sum(r.prompt_tokens == n for r, n in reported), len(reported)],
            "warmup": [{k: getattr(r, k) for k in ("prompt_tokens", "usage_tokens", "tokens", "finish_reason", "error")} for r in warm],
            "offline_reference": str(reference) if offline is not None else None, "quality": quality(records, offline, seed)}
    return out, records
