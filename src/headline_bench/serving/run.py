"""Serve one entry under load and measure it (the serve stage's work)."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headline_bench.backends.base import ServerSpec
from headline_bench.errors import InputError, Skip
from headline_bench.files import GENERATIONS, SERVING_METRICS, read_jsonl
from headline_bench.logs import log
from headline_bench.measure.environment import env_info
from headline_bench.measure.timing_lock import timed_section
from headline_bench.serving.client_check import Arrivals, check, client_bound, cpu_facts, null_payloads, timed, tokens_per_row
from headline_bench.serving.goodput import combine_runs, level_summary, next_rate, requests_needed, sustainable_rate, verdict
from headline_bench.serving.loadgen import RequestResult, run_concurrency, run_rate
from headline_bench.serving.served_quality import served_states
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


def arrivals(url: str, payloads: list[dict[str, Any]], kind: str, value: float, run: int | None, s: Serve, seed: int) -> Arrivals:
    """One level's requests: open loop at a rate (the run's own Poisson schedule) or closed loop at a concurrency."""
    if kind == "rate":
        return run_rate(url, payloads, value, s.requests, (seed, run or 1), s.max_duration_s, s.timeout_s)
    return run_concurrency(url, payloads, int(value), s.requests, s.max_duration_s, s.timeout_s)


def measure(server: Server, payloads: list[dict[str, Any]], s: Serve, seed: int, levels: list[dict[str, Any]],
            requests: list[tuple[str, RequestResult]], warm: list[RequestResult], mismatch: Callable[[RequestResult], bool]) -> None:
    """Warm up (streams read to their end, so the server's token usage arrives), then s.runs independent rate
    searches, each with its own arrival schedules: the rates of s.rates from low to high until one is
    overloaded (goodput share below s.overload_share), then up to s.search_steps bisecting rates; then every
    concurrency level once. Appends to `levels` and `requests` as it goes (so a failure keeps what was measured).
    Each level records the client's CPU over it; one where the client used s.client.max_cpu_share of a core is
    client-bound at once (so the search treats it as failed), and one during which the server died is kept, failed.

    Args:
        server: a started server.
        payloads: request bodies, cycled in order.
        s: params `serve`.
        seed: base.seed, for the arrival schedules.
        levels / requests / warm: filled in place.
        mismatch: whether a request's prompt reached the server otherwise than offline (never a good request).
    """
    url = server.url + "/v1/completions"
    slo = s.slo.model_dump()
    warm += asyncio.run(run_concurrency(url, payloads, 1, s.warmup_requests, s.max_duration_s, s.timeout_s, stop=None))[0]
    if warm and all(r.error for r in warm):
        raise ServerError(f"every warm-up request failed: {warm[0].error}")

    def level(kind: str, value: float, run: int | None = None) -> None:
        label = f"{kind} {value:g}" if run is None else f"run {run} {kind} {value:g}"
        results, wall, cpu = timed(arrivals(url, payloads, kind, value, run, s, seed))
        summary = level_summary([r.to_dict() | {"prompt_mismatch": mismatch(r)} for r in results], wall, slo) | cpu_facts(cpu, wall, len(results))
        lv = {"level": label, "kind": kind, kind: value, "run": run, **summary}
        lv["client_bound"] = client_bound(lv, None, slo, s.client.max_cpu_share, s.client.max_floor_share)
        lv["server_died"] = not server.alive(grace_s=1.0 if summary["errors"] else 0.0)
        levels.append(lv | {"verdict": verdict(lv, s.slo.share)})
        requests.extend((label, r) for r in results)
        log.info("%s: %d/%d ok, %d good, %d empty, TTFT p50 %s s, goodput share %s, client CPU %.0f%% of a core (%s)", label, summary["ok"], summary["sent"],
                 summary["good"], summary["empty"], f"{summary['ttft_s'].get('p50', float('nan')):.3f}",
                 f"{summary['goodput_share']:.2f}" if summary["sent"] else "—", 100 * summary["client_cpu_share"], levels[-1]["verdict"])
        if lv["server_died"]:
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


def prompt_counts(results: list[RequestResult], kept: list[dict[str, Any]]) -> dict[Any, int]:
    """The server's own prompt-token count of each row it reported one for (row id -> count)."""
    return {kept[r.index % len(kept)]["id"]: r.prompt_tokens for r in results if r.prompt_tokens is not None}


def mismatch_of(ids: list[list[int]], differs: list[bool], kept: list[dict[str, Any]], counts: dict[Any, int]) -> Callable[[RequestResult], bool]:
    """Whether a request's prompt reached the server otherwise than offline: its text re-tokenizes to other ids, or the
    server counted another number of prompt tokens (in this request's usage, or for this row in the quality pass)."""
    def mismatch(r: RequestResult) -> bool:
        i = r.index % len(kept)
        count = r.prompt_tokens if r.prompt_tokens is not None else counts.get(kept[i]["id"])
        return differs[i] or (count is not None and count != len(ids[i]))
    return mismatch


def record(label: str, r: RequestResult, kept: list[dict[str, Any]], ids: list[list[int]], mismatch: Callable[[RequestResult], bool]) -> dict[str, Any]:
    """One data/served record: the row, the served headline (None on error) and the request's timings and facts."""
    i = r.index % len(kept)
    return {"id": kept[i]["id"], "reference": kept[i]["reference"], "level": label, "prediction": None if r.error else r.headline,
            "raw": r.text, "offline_prompt_tokens": len(ids[i]), "prompt_mismatch": mismatch(r), **{k: v for k, v in r.to_dict().items() if k not in ("text", "headline")}}


def serve(name: str, entry: ServingEntry, params: Params, rows: list[dict[str, Any]],
          quality_rows: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one serving entry end to end. Returns serve.json's content and the per-request records.

    Order: start; the served quality pass (every quality row once at concurrency 1, streams drained for the server's
    prompt counts); warm-up and the load levels (goodput needs those counts); optionally the quality rows again at the
    sustainable rate; stop; then each level replayed against a null server (the client's own floor). A machine that
    cannot run the entry gives {"skipped": reason}; a server that fails to start or dies gives {"failed": ...,
    "traceback": [...]} with the levels measured before it. The server is stopped either way.
    """
    s, seed = serve_settings(params), params.base.seed
    out: dict[str, Any] = {"entry": name, "config": recorded(entry), "env": env_info(), "load": s.model_dump(exclude={"slo"}), "slo": s.slo.model_dump(),
                           "requests_needed": requests_needed(s.slo.share, s.slo.confidence)}
    if not entry.enabled:
        log.info("%s: skipped: serving.%s.enabled is false", name, name)
        return out | {"skipped": f"disabled in params (serving.{name}.enabled: false; `dvc exp run -S serving.{name}.enabled=true` runs it)"}, []
    levels: list[dict[str, Any]] = []
    timed_requests: list[tuple[str, RequestResult]] = []
    served_q: list[tuple[str, RequestResult]] = []
    warm: list[RequestResult] = []
    kept: list[dict[str, Any]] = []
    q_kept: list[dict[str, Any]] = []
    ids: list[list[int]] = []
    q_ids: list[list[int]] = []
    differs: list[bool] = []
    q_differs: list[bool] = []
    counts: dict[Any, int] = {}
    spec: ServerSpec | None = None
    device: str | None = None
    payloads: list[dict[str, Any]] = []
    try:
        server, spec, info = start(entry, params, SERVING_METRICS / name / "server.log")
        out["server"], device = info, info.get("device")
        with server:
            url = server.url + "/v1/completions"
            out["prompt_mode"] = f"/v1/completions, prompt as {'token ids' if spec.token_prompts else 'text'} (chat template applied by the client)"
            payloads, kept, ids, differs = payloads_for(rows, params, entry, spec)
            log.info("%s: %s ready on port %d after %.1f s", name, entry.engine, server.port, server.startup_s)
            if quality_rows:
                q_payloads, q_kept, q_ids, q_differs = payloads_for(quality_rows, params, entry, spec)
                q_payloads = [p | entry.quality_request for p in q_payloads]
                results, wall = asyncio.run(run_concurrency(url, q_payloads, 1, len(q_payloads), s.quality.max_duration_s, s.timeout_s, drain=True))
                served_q += [("quality concurrency 1", r) for r in results]
                counts = prompt_counts(results, q_kept)
                log.info("%s: served quality pass, %d rows in %.1f s", name, len(results), wall)
                if not server.alive(grace_s=1.0):
                    raise ServerError(f"server exited with code {server.proc.returncode} during the served quality pass: {server.log_tail()}")
            with timed_section(f"serve {name}") as lock:  # the load levels; the server's start and the quality pass are untimed
                out["timing_lock"] = lock.facts()
                measure(server, payloads, s, seed, levels, timed_requests, warm, mismatch_of(ids, differs, kept, counts))
            rate = rate_runs(levels, s.slo.share)["rate"]
            if quality_rows and s.quality.at_sustainable_rate and rate:
                results, _ = asyncio.run(run_rate(url, q_payloads, rate, len(q_payloads), (seed, 0), s.quality.max_duration_s, s.timeout_s))
                served_q += [(f"quality rate {rate:g}", r) for r in results]
            out["server"]["exit_code"] = server.stop()
    except Skip as e:
        log.warning("%s: skipped: %s", name, e)
        return out | {"skipped": str(e)}, []
    except InputError:
        raise  # bad params or inputs (unconverted model): a one-line error, not a recorded failure
    except Exception as e:  # a server that would not start or died, or anything unexpected: recorded, the pipeline goes on
        log.error("%s: failed: %s", name, e)
        out |= {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "traceback": traceback.format_exc().splitlines()[-6:]}
    mismatch, q_mismatch = mismatch_of(ids, differs, kept, counts), mismatch_of(q_ids, q_differs, q_kept, counts)
    records = [record(label, r, kept, ids, mismatch) for label, r in timed_requests]
    q_records = [record(label, r, q_kept, q_ids, q_mismatch) for label, r in served_q]
    if levels and s.client.calibrate and "failed" not in out:
        tokens = tokens_per_row(records + q_records)
        nulls = null_payloads(payloads, [tokens.get(row["id"]) or params.generate.max_new_tokens for row in kept])
        out["client_check"] = check(levels, lambda url, kind, value: arrivals(url, nulls, kind, value, 1, s, seed), s)
    reference = GENERATIONS / f"{entry.reference}.jsonl"
    offline = read_jsonl(reference) if entry.reference and reference.exists() else None
    out |= {"samples": len(kept), "levels": levels, "sustainable_rate": rate_runs(levels, s.slo.share),
            "prompt_check": prompt_check(spec, ids, differs, kept, warm) | {"server_counts_match_quality_rows": count_match(counts, q_ids, q_kept)},
            "warmup": [{k: getattr(r, k) for k in ("prompt_tokens", "usage_tokens", "tokens", "finish_reason", "error")} for r in warm],
            "offline_reference": str(reference) if offline is not None else None, "quality": quality(records, offline, seed),
            "served_quality": served_states(q_records, params, entry, device, [r["id"] for r in quality_rows]) if quality_rows else None}
    return out, q_records + records


def count_match(counts: dict[Any, int], ids: list[list[int]], kept: list[dict[str, Any]]) -> list[int]:
    """[rows whose server prompt count equals the offline count, rows the server reported a count for]."""
    offline = {row["id"]: len(i) for row, i in zip(kept, ids)}
    return [sum(counts[k] == offline.get(k) for k in counts), len(counts)]
