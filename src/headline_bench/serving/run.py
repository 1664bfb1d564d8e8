"""Serve one entry under load and measure it (the serve stage's work)."""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path
from typing import Any

from headline_bench.backends.base import ServerSpec
from headline_bench.errors import InputError, Skip
from headline_bench.files import GENERATIONS, SERVING_METRICS, read_jsonl
from headline_bench.logs import log
from headline_bench.measure.environment import env_info
from headline_bench.measure.timing_lock import timed_section
from headline_bench.serving.goodput import combine_runs, level_summary, next_rate, requests_needed, sustainable_rate, verdict
from headline_bench.serving.loadgen import RequestResult, run_concurrency, run_rate
from headline_bench.serving.server import HOST, PortTaken, Server, ServerError, free_port
from headline_bench.settings import Params, Serve, ServingEntry


def resolve_entry(params: Params, name: str) -> ServingEntry:
    """The entry's settings, with the model defaulting to base.model; an unknown entry (a command-line argument) is an InputError."""
    if name not in params.serving:
        raise InputError(f"unknown serving entry '{name}'; params.yaml serving: defines {', '.join(params.serving) or 'none'}")
    entry = params.serving[name]
    return entry if entry.model else entry.model_copy(update={"model": params.base.model})


def serve_settings(params: Params) -> Serve:
    """params `serve`, which serving needs."""
    if params.serve is None:
        raise InputError("params.yaml: serve: missing (serving needs it)")
    return params.serve


def recorded(entry: ServingEntry) -> dict[str, Any]:
    """What serve.json keeps under "config": the model, then the keys params.yaml set (the report's knobs)."""
    return {"model": entry.model, **entry.model_dump(mode="json", exclude_unset=True)}


def server_for(entry: ServingEntry, params: Params, log_path: Path) -> tuple[Server, ServerSpec, dict[str, Any]]:
    """The entry's Server (not started) on a free port, its ServerSpec (model name, how prompts reach it) and facts
    for serve.json. Skip when it cannot run here."""
    from headline_bench.backends import engine
    from headline_bench.techniques.config import pick_device

    device, port = pick_device(params.base.device), free_port()
    spec = engine(entry.engine).server(entry, params, port, device, HOST)
    info: dict[str, Any] = {"engine": entry.engine, "device": device, "port": port, **spec.info, "argv": spec.argv}
    return Server(spec.argv, port, spec.health_path, log_path, env={"OMP_NUM_THREADS": str(spec.threads)}), spec, info


def payloads_for(rows: list[dict[str, Any]], params: Params, entry: ServingEntry, spec: ServerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[int]], list[bool]]:
    """Request bodies for the rows: the generate stage's prompts, greedy, newline stop, generate.max_new_tokens,
    plus the entry's `request` fields (engine-specific: llama-cpp-python's server applies repeat_penalty 1.1
    unless the request says otherwise).

    The prompt is the engine's offline token ids where its server takes ids (ServerSpec.token_prompts), else the
    prompt text; then each row's text is re-tokenized the way the server does (ServerSpec.text_ids), and a row whose
    ids differ from the offline ids (a summary holding `</s>` parsed as a control token, a BOS added twice) is marked.

    Returns:
        the bodies, the rows kept (prompts over generate.max_input_tokens are left out, as offline), each prompt's
        offline token ids and whether the server sees other ids than those.
    """
    from transformers import AutoTokenizer

    from headline_bench.data.prompts import prompts_for
    from headline_bench.models.ref import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path(entry.model))
    prompts, kept, _ = prompts_for(rows, tokenizer, params.prompt, params.generate.max_input_tokens)
    ids = [spec.prompt_ids(p) if spec.prompt_ids else list(p.ids) for p in prompts]
    differs = [False if spec.token_prompts or spec.text_ids is None else spec.text_ids(str(p)) != i for p, i in zip(prompts, ids)]
    body = {"model": spec.model_name, "max_tokens": params.generate.max_new_tokens, "temperature": 0.0, "stop": ["\n"], **entry.request}
    return [body | {"prompt": i if spec.token_prompts else str(p)} for p, i in zip(prompts, ids)], kept, ids, differs


def start(entry: ServingEntry, params: Params, log_path: Path, attempts: int = 3) -> tuple[Server, ServerSpec, dict[str, Any]]:
    """Start the entry's server; a port that another process took first (PortTaken) is retried on a new port."""
    for attempt in range(1, attempts + 1):
        server, spec, info = server_for(entry, params, log_path)
        try:
            server.start(serve_settings(params).startup_timeout_s)
            return server, spec, info | {"startup_s": server.startup_s, "port_attempts": attempt}
        except PortTaken as e:
            server.stop()
            log.warning("port %d taken by another process (attempt %d/%d): %s", server.port, attempt, attempts, e)
            if attempt == attempts:
                raise
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


def measure(server: Server, payloads: list[dict[str, Any]], s: Serve, seed: int, levels: list[dict[str, Any]],
            requests: list[tuple[str, RequestResult]], warm: list[RequestResult]) -> None:
    """Warm up (streams read to their end, so the server's token usage arrives), then s.runs independent rate
    searches, each with its own arrival schedules: the rates of s.rates from low to high until one is
    overloaded (goodput share below s.overload_share), then up to s.search_steps bisecting rates; then every
    concurrency level once. Appends to `levels` and `requests` as it goes (so a failure keeps what was measured).

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

    def level(kind: str, value: float, run: int | None = None) -> None:
        label = f"{kind} {value:g}" if run is None else f"run {run} {kind} {value:g}"
        arrivals = run_rate(url, payloads, value, n, (seed, run or 1), span, timeout) if kind == "rate" else run_concurrency(url, payloads, int(value), n, span, timeout)
        results, wall = asyncio.run(arrivals)
        summary = level_summary([r.to_dict() for r in results], wall, slo)
        levels.append({"level": label, "kind": kind, kind: value, "run": run, **summary, "verdict": verdict(summary, s.slo.share)})
        requests.extend((label, r) for r in results)
        log.info("%s: %d/%d ok, %d good, %d empty, TTFT p50 %s s, goodput share %s (%s)", label, summary["ok"], summary["sent"], summary["good"], summary["empty"],
                 f"{summary['ttft_s'].get('p50', float('nan')):.3f}", f"{summary['goodput_share']:.2f}" if summary["sent"] else "—", levels[-1]["verdict"])
        if not server.alive(grace_s=1.0 if summary["errors"] else 0.0):
            raise ServerError(f"server exited with code {server.proc.returncode} during {label}: {server.log_tail()}")

    for run in range(1, s.runs + 1):
        for rate in sorted(s.rates):
            level("rate", rate, run)
            if levels[-1]["goodput_share"] is not None and levels[-1]["goodput_share"] < s.overload_share:
                break  # overloaded: higher rates only queue longer, and the pass/fail bracket is found
        mine = [lv for lv in levels if lv.get("run") == run]
        for _ in range(s.search_steps):
            rate = next_rate(mine, s.slo.share, s.search_min_gap)
            if rate is None or any(lv.get("rate") == rate for lv in mine):
                break
            level("rate", round(rate, 3), run)
            mine.append(levels[-1])
    for c in s.concurrency:
        level("concurrency", c)


def rate_runs(levels: list[dict[str, Any]], share: float) -> dict[str, Any]:
    """The sustainable rate of each run's rate search, combined (the lowest, with the runs' spread)."""
    runs = sorted({lv["run"] for lv in levels if lv.get("rate") is not None and lv.get("run") is not None})
    return combine_runs([sustainable_rate([lv for lv in levels if lv.get("run") == r], share) | {"run": r} for r in runs])


def quality(records: list[dict[str, Any]], offline: list[dict[str, Any]] | None, seed: int) -> dict[str, Any]:
    """ROUGE of every served headline (score.rouge: the same metric module) and how many equal the offline greedy
    headline of the row, per request and per row. A row whose served prompt differs from the offline prompt by token
    ids (`prompt_differs`) is never counted as identical, whatever its text: it was not the same input; such rows are
    listed. A row is identical when every served headline of it equals the offline one."""
    from headline_bench.quality.rouge import rouge

    served = [r for r in records if r.get("prediction") is not None]
    differs = sorted({r["id"] for r in records if r.get("prompt_differs")})
    if not served:
        return {"served": 0, "prompt_differs_rows": differs}
    out: dict[str, Any] = {"served": len(served), **{k: float(v) for k, v in rouge([r["prediction"] for r in served], [r["reference"] for r in served], seed).items()}}
    per_row: dict[Any, set[str]] = {}
    for r in served:
        per_row.setdefault(r["id"], set()).add(r["prediction"])
    out["rows_with_varying_headlines"] = sum(len(v) > 1 for v in per_row.values())
    out["prompt_differs_rows"] = differs
    if offline is not None:
        ref = {r["id"]: r["prediction"] for r in offline if r.get("prediction") is not None}
        pairs = [(r, ref[r["id"]]) for r in served if r["id"] in ref]

        def same(r: dict[str, Any], p: str) -> bool:
            return r["prediction"] == p and not r.get("prompt_differs")

        by_level: dict[str, list[int]] = {}
        row_same: dict[Any, bool] = {}
        for r, p in pairs:
            by_level.setdefault(r["level"], [0, 0])[0] += same(r, p)
            by_level[r["level"]][1] += 1
            row_same[r["id"]] = row_same.get(r["id"], True) and same(r, p)
        first = next(({"id": r["id"], "level": r["level"], "served": r["prediction"], "offline": p, "prompt_differs": bool(r.get("prompt_differs"))}
                      for r, p in pairs if not same(r, p)), None)
        out |= {"identical_to_offline": sum(same(r, p) for r, p in pairs), "compared_to_offline": len(pairs), "identical_by_level": by_level,
                "rows_identical": sum(row_same.values()), "rows_compared": len(row_same), "first_difference": first}
    return out


def prompt_check(spec: ServerSpec | None, ids: list[list[int]], differs: list[bool], kept: list[dict[str, Any]], warm: list[RequestResult]) -> dict[str, Any]:
    """How the served prompts compare with the offline prompts by token ids, and the server's own prompt counts."""
    reported = [(r, len(ids[r.index % len(ids)])) for r in warm if r.prompt_tokens is not None]
    mode = "token ids (the offline ids sent as the prompt)" if spec and spec.token_prompts else "text (re-tokenized as the server does and compared)"
    return {"mode": mode, "rows": len(ids), "identical_ids": len(ids) - sum(differs), "differing_rows": [kept[i]["id"] for i, d in enumerate(differs) if d],
            "server_counts_match": [sum(r.prompt_tokens == n for r, n in reported), len(reported)]}


def serve(name: str, entry: ServingEntry, params: Params, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one serving entry end to end. Returns serve.json's content and the per-request records.

    A machine that cannot run the entry gives {"skipped": reason}; a server that fails to start or dies gives
    {"failed": ..., "traceback": [...]} with the levels measured before it. The server is stopped either way.
    """
    s, seed = serve_settings(params), params.base.seed
    out: dict[str, Any] = {"entry": name, "config": recorded(entry), "env": env_info(), "load": s.model_dump(exclude={"slo"}), "slo": s.slo.model_dump(),
                           "requests_needed": requests_needed(s.slo.share, s.slo.confidence)}
    levels: list[dict[str, Any]] = []
    timed: list[tuple[str, RequestResult]] = []
    warm: list[RequestResult] = []
    kept: list[dict[str, Any]] = []
    ids: list[list[int]] = []
    differs: list[bool] = []
    spec: ServerSpec | None = None
    try:
        server, spec, info = start(entry, params, SERVING_METRICS / name / "server.log")
        out["server"] = info
        with server:
            out["prompt_mode"] = f"/v1/completions, prompt as {'token ids' if spec.token_prompts else 'text'} (chat template applied by the client)"
            payloads, kept, ids, differs = payloads_for(rows, params, entry, spec)
            log.info("%s: %s ready on port %d after %.1f s", name, entry.engine, server.port, server.startup_s)
            with timed_section(f"serve {name}") as lock:  # the load levels; the server's start above is untimed
                out["timing_lock"] = lock.facts()
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
        i = r.index % len(kept)
        records.append({"id": kept[i]["id"], "reference": kept[i]["reference"], "level": label, "prediction": None if r.error else r.headline,
                        "raw": r.text, "offline_prompt_tokens": len(ids[i]), "prompt_differs": differs[i],
                        **{k: v for k, v in r.to_dict().items() if k not in ("text", "headline")}})
    reference = GENERATIONS / f"{entry.reference}.jsonl"
    offline = read_jsonl(reference) if entry.reference and reference.exists() else None
    out |= {"samples": len(kept), "levels": levels, "sustainable_rate": rate_runs(levels, s.slo.share),
            "prompt_check": prompt_check(spec, ids, differs, kept, warm),
            "warmup": [{k: getattr(r, k) for k in ("prompt_tokens", "usage_tokens", "tokens", "finish_reason", "error")} for r in warm],
            "offline_reference": str(reference) if offline is not None else None, "quality": quality(records, offline, seed)}
    return out, records
