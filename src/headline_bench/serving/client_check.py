"""Client self-check: what the load generator costs, and the latency it measures when the server costs nothing.

The client and the server share the machine, so a client short of CPU stamps chunks late and sets the numbers
itself (AIPerf on this 2-core machine: TTFT 6.7 s against the project's 0.27 s for the same server). Two checks:
- CPU: the client process's CPU time (time.process_time, every thread of the stage process: the event loop, JSON,
  aiohttp) over each level, per request and as a share of one core over the level's wall time;
- floor: a level replayed against the null server (null_server.py: instant answers with the same token count per row)
  with the same schedule or concurrency; the TTFT, ITL and TPOT measured there are the client's own floor. The
  client's cost grows with the load it drives (more streams in flight on one event loop), so the levels of each kind
  are replayed from the heaviest down, and once a level's floor is clear of the limits it stands as the bound for
  every lighter level of that kind (each records which level it was measured at). Why: replaying every open-loop level
  cost as long as the levels' own arrival schedules (~80 s per serving entry here), mostly at rates whose floor the
  heaviest rate already bounds.
A level is client-bound, and fails whatever its share, when the client used `max_cpu_share` of a core, or when its
floor's P90 TTFT or TPOT reaches `max_floor_share` of the SLO limit (the client alone would eat that much of it).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headline_bench.logs import log
from headline_bench.serving.goodput import summarize, verdict
from headline_bench.serving.loadgen import RequestResult
from headline_bench.serving.server import Server, free_port

if TYPE_CHECKING:
    from headline_bench.settings import Serve

NULL_SERVER = Path(__file__).with_name("null_server.py")
Arrivals = Coroutine[Any, Any, tuple[list[RequestResult], float]]


def timed(arrivals: Arrivals) -> tuple[list[RequestResult], float, float]:
    """Run one level's requests; returns (results, wall s, the client process's CPU s over them)."""
    cpu = time.process_time()
    results, wall = asyncio.run(arrivals)
    return results, wall, time.process_time() - cpu


def cpu_facts(cpu_s: float, wall_s: float, sent: int) -> dict[str, Any]:
    """The client's CPU over a level: total, per request, and as a share of one core over the level's wall time."""
    return {"client_cpu_s": cpu_s, "client_cpu_s_per_request": cpu_s / sent if sent else None, "client_cpu_share": cpu_s / max(wall_s, 1e-9)}


def null_payloads(payloads: list[dict[str, Any]], tokens: list[int]) -> list[dict[str, Any]]:
    """The level's request bodies with max_tokens set to the token count the real server produced for each row."""
    return [p | {"max_tokens": max(1, n)} for p, n in zip(payloads, tokens)]


def floor(results: list[RequestResult], wall_s: float, cpu_s: float) -> dict[str, Any]:
    """The client's own TTFT, ITL and TPOT at one level, measured against the null server."""
    ok = [r for r in results if not r.error]
    return {"sent": len(results), "errors": len(results) - len(ok), "ttft_s": summarize([r.ttft_s for r in ok]),
            "itl_s": summarize([g for r in ok for g in r.itl_s]), "tpot_s": summarize([r.tpot_s for r in ok]), **cpu_facts(cpu_s, wall_s, len(results))}


def calibrate(keys: list[tuple[str, float]], replay: Callable[[str, str, float], Arrivals], clear: Callable[[dict[str, Any]], bool] = lambda f: False,
              startup_timeout_s: float = 30) -> dict[tuple[str, float], dict[str, Any]]:
    """The floor of each level (kind, value) against a null server on 127.0.0.1 (its log in a temporary folder), the
    levels of each kind replayed from the heaviest down until one is `clear` (its floor within the limits): that floor
    then bounds every lighter level of its kind (recorded as `measured_at`).

    Args:
        keys: the distinct levels measured.
        replay: (null server's completions url, kind, value) -> the level's arrivals with the null payloads.
        clear: whether a floor is clear of the limits (the default, never: every level is replayed).
    """
    port = free_port()
    floors: dict[tuple[str, float], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, Server([sys.executable, str(NULL_SERVER), str(port)], port, "/health", Path(tmp) / "null.log") as null:
        null.start(startup_timeout_s)
        for kind in sorted({k for k, _ in keys}):
            values = sorted((v for k, v in keys if k == kind), reverse=True)
            for i, value in enumerate(values):
                floor_ = floor(*timed(replay(null.url + "/v1/completions", kind, value))) | {"measured_at": f"{kind} {value:g}"}
                floors[(kind, value)] = floor_
                if clear(floor_):
                    floors |= {(kind, lighter): floor_ for lighter in values[i + 1:]}
                    break
    return floors


def client_bound(level: dict[str, Any], floor_: dict[str, Any] | None, slo: dict[str, float], max_cpu_share: float,
                 max_floor_share: float) -> str | None:
    """Why the client, not the server, may have set this level's numbers; None when neither check says so."""
    share = level.get("client_cpu_share")
    if share is not None and share >= max_cpu_share:
        return f"the client used {share:.0%} of a core (limit {max_cpu_share:.0%})"
    for metric in ("ttft_s", "tpot_s"):
        p90 = ((floor_ or {}).get(metric) or {}).get("p90")
        if p90 is not None and p90 >= max_floor_share * slo[metric]:
            return f"the client's own P90 {metric[:-2].upper()} {p90 * 1000:.1f} ms is >= {max_floor_share:.0%} of the SLO's {slo[metric] * 1000:g} ms"
    return None


def mark(levels: list[dict[str, Any]], floors: dict[tuple[str, float], dict[str, Any]], slo: dict[str, float], share: float,
         max_cpu_share: float, max_floor_share: float) -> None:
    """Attach each level's floor, mark client-bound levels and restate their verdicts (in place)."""
    for lv in levels:
        lv["client_floor"] = floors.get((lv["kind"], lv[lv["kind"]]))
        lv["client_bound"] = client_bound(lv, lv["client_floor"], slo, max_cpu_share, max_floor_share)
        lv["verdict"] = verdict(lv, share)


def tokens_per_row(records: list[dict[str, Any]]) -> dict[Any, int]:
    """The most text chunks the real server sent for each row (row id -> count): what the null server sends back."""
    tokens: dict[Any, int] = {}
    for r in records:
        tokens[r["id"]] = max(tokens.get(r["id"], 0), r.get("tokens") or 0)
    return tokens


def check(levels: list[dict[str, Any]], replay: Callable[[str, str, float], Arrivals], s: Serve) -> dict[str, Any]:
    """Replay every measured level against the null server, mark client-bound levels (in place) and return the
    calibration's facts for serve.json; a calibration that cannot run is recorded, and levels keep the CPU check only.

    Args:
        levels: the measured levels.
        replay: (null server's completions url, kind, value) -> the level's arrivals with the null payloads.
        s: params `serve` (slo, client).
    """
    keys = sorted({(lv["kind"], lv[lv["kind"]]) for lv in levels})
    slo = s.slo.model_dump()
    try:
        floors = calibrate(keys, replay, lambda f: client_bound({}, f, slo, s.client.max_cpu_share, s.client.max_floor_share) is None)
    except Exception as e:
        log.error("client floor not measured: %s", e)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    mark(levels, floors, slo, s.slo.share, s.client.max_cpu_share, s.client.max_floor_share)
    top = {m: max((f[m].get("p90") or 0) for f in floors.values()) for m in ("ttft_s", "itl_s", "tpot_s")}
    return {"levels": len(keys), "replayed": sorted({f["measured_at"] for f in floors.values()}), "client_bound_levels": [lv["level"] for lv in levels if lv.get("client_bound")],
            "floor_ttft_s_p90_max": top["ttft_s"], "floor_itl_s_p90_max": top["itl_s"], "floor_tpot_s_p90_max": top["tpot_s"],
            "client_cpu_share_max": max((lv.get("client_cpu_share") or 0) for lv in levels)}
