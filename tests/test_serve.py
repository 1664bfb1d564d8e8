"""Serving under load: arrival schedules, client-side timing from a scripted stream, goodput and the rate
search on synthetic latencies, and the server lifecycle (no process left behind). Localhost only."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headline_bench.serving import run as serve
from headline_bench.serving.goodput import level_summary, next_rate, summarize, sustainable_rate
from headline_bench.serving.loadgen import poisson_arrivals, run_concurrency, run_rate, stream_request
from headline_bench.serving.server import Server, ServerError, free_port, group_alive
from headline_bench.settings import parse

FAKE = Path(__file__).resolve().parent / "fake_openai_server.py"
SLO = {"ttft_s": 2.0, "tpot_s": 0.1, "share": 0.99}


def fake_server(tmp_path: Path, *flags: str) -> Server:
    port = free_port()
    return Server([sys.executable, str(FAKE), str(port), *flags], port, "/health", tmp_path / "server.log")


def gone(server: Server) -> bool:
    return server.proc.poll() is not None and not group_alive(server.proc.pid)


# --- arrival schedule --------------------------------------------------------------------------------------------

def test_poisson_schedule_statistics_for_a_fixed_seed():
    times = poisson_arrivals(rate=4.0, n=4000, seed=7, max_duration_s=1e9)
    gaps = np.diff([0.0, *times])
    assert times == poisson_arrivals(rate=4.0, n=4000, seed=7, max_duration_s=1e9)  # seeded: the same schedule every run
    assert times != poisson_arrivals(rate=4.0, n=4000, seed=8, max_duration_s=1e9)
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.05               # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05            # exponential gaps: coefficient of variation 1
    assert abs((gaps < 0.25).mean() - (1 - np.exp(-1))) < 0.03  # P(gap < mean) = 1 - 1/e
    counts = np.bincount(np.asarray(times, dtype=int))[:-1]    # arrivals per second: Poisson, variance = mean
    assert abs(counts.mean() - 4) < 0.3 and abs(counts.var() / counts.mean() - 1) < 0.25


def test_poisson_schedule_is_bounded_in_count_and_duration():
    times = poisson_arrivals(rate=10.0, n=1000, seed=1, max_duration_s=5.0)
    assert max(times) <= 5.0 and 30 < len(times) < 75
    assert len(poisson_arrivals(rate=10.0, n=12, seed=1, max_duration_s=1e9)) == 12


# --- goodput maths -----------------------------------------------------------------------------------------------

def req(ttft: float, tpot: float | None, error: str | None = None, timed_out: bool = False) -> dict:
    return {"ttft_s": None if error else ttft, "tpot_s": tpot, "e2e_s": None if error else ttft + 10 * (tpot or 0), "itl_s": [tpot or 0] * 10,
            "tokens": 11, "error": error, "timed_out": timed_out}


def test_goodput_counts_errors_and_timeouts_as_misses():
    requests = [req(0.5, 0.05), req(1.9, 0.09), req(2.1, 0.05), req(0.5, 0.11), req(0, None, "HTTP 500"), req(0, None, "timed out", True)]
    lv = level_summary(requests, wall_s=2.0, slo=SLO)
    assert (lv["sent"], lv["ok"], lv["errors"], lv["timeouts"], lv["good"]) == (6, 4, 1, 1, 2)
    assert lv["goodput"] == pytest.approx(1.0) and lv["goodput_share"] == pytest.approx(2 / 6)
    assert lv["request_throughput"] == pytest.approx(2.0) and lv["output_token_throughput"] == pytest.approx(22.0)
    assert lv["ttft_s"]["n"] == 4 and lv["itl_s"]["n"] == 40


def test_summaries_show_max_instead_of_p99_below_100_samples():
    small, large = summarize(list(range(1, 11))), summarize([float(x) for x in range(1, 201)])
    assert "p99" not in small and small["max"] == 10 and small["p50"] == pytest.approx(5.5) and small["n"] == 10
    assert large["p99"] == pytest.approx(np.percentile(range(1, 201), 99))
    assert summarize([]) == {"n": 0}


def levels(shares: dict[float, float]) -> list[dict]:
    return [{"rate": r, "goodput_share": s} for r, s in shares.items()]


def test_rate_search_bisects_the_pass_fail_bracket():
    measured = levels({1: 1.0, 2: 1.0, 4: 0.5})
    assert next_rate(measured, 0.99, min_gap=0.15) == 3
    measured += levels({3: 1.0})
    assert next_rate(measured, 0.99, min_gap=0.15) == 3.5     # bracket 3..4 is still 25% wide
    assert next_rate(measured, 0.99, min_gap=0.3) is None      # narrow enough
    sr = sustainable_rate(measured, 0.99)
    assert sr["rate"] == 3 and sr["bound"] == "measured" and sr["bracket"] == [3, 4]
    assert sr["interpolated"] == pytest.approx(3 + (1.0 - 0.99) / (1.0 - 0.5))


def test_rate_search_edges():
    assert sustainable_rate(levels({1: 1.0, 2: 1.0}), 0.99)["bound"] == "at least"
    assert next_rate(levels({1: 1.0, 2: 1.0}), 0.99, 0.15) is None
    none_pass = levels({1: 0.5, 2: 0.0})
    assert sustainable_rate(none_pass, 0.99) | {} == {"rate": None, "bound": "below", "bracket": [None, 1], "interpolated": None, "share": 0.99}
    assert next_rate(none_pass, 0.99, 0.15) == 0.5              # halve below the lowest failure
    assert sustainable_rate(levels({1: 1.0, 2: 0.5, 3: 1.0}), 0.99)["rate"] == 1   # a pass above a failure is not trusted
    assert sustainable_rate([{"concurrency": 1, "goodput_share": 1.0}], 0.99)["bound"] == "not measured"


# --- client-side timing from a scripted stream -------------------------------------------------------------------

async def one(url: str, payload: dict, timeout_s: float = 5.0):
    from headline_bench.serving.loadgen import new_session

    async with new_session(timeout_s) as session:
        return await stream_request(session, url, payload, timeout_s, 0, time.perf_counter())


def test_ttft_and_inter_token_gaps_from_a_scripted_stream(tmp_path):
    with fake_server(tmp_path) as server:
        server.start(30)
        r = asyncio.run(one(server.url + "/v1/completions", {"prompt": "x"}))
    assert r.error is None and r.text == "Hello world\n"         # stops reading at the newline: " tail" is never read
    assert r.tokens == 3 and len(r.itl_s) == 2
    assert 0.18 < r.ttft_s < 0.35                                # scripted: first chunk after 0.2 s
    assert all(0.08 < g < 0.2 for g in r.itl_s)                  # then one chunk every 0.1 s
    assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s))
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 2)


def test_errors_and_timeouts_are_recorded_not_dropped(tmp_path):
    with fake_server(tmp_path) as server:
        server.start(30)
        bad = asyncio.run(one(server.url + "/v1/completions", {"prompt": "bad"}))
        cut = asyncio.run(one(server.url + "/v1/completions", {"prompt": "cut"}))
        results, wall = asyncio.run(run_rate(server.url + "/v1/completions", [{"prompt": "x"}, {"prompt": "bad"}], 20.0, 6, 1, 10.0, 5.0))
    assert bad.error.startswith("HTTP 500") and not bad.timed_out
    assert cut.error.startswith("stream ended without a finish_reason") and cut.text == "Hel"
    assert len(results) == 6 and [r.error is None for r in results] == [True, False] * 3
    with fake_server(tmp_path, "--stall") as server:
        server.start(30)
        slow, _ = asyncio.run(run_concurrency(server.url + "/v1/completions", [{"prompt": "x"}], 2, 2, 10.0, 0.5))
    assert len(slow) == 2 and all(r.timed_out and r.error for r in slow)
    assert level_summary([r.to_dict() for r in slow], 0.5, SLO)["timeouts"] == 2


def test_closed_loop_keeps_the_concurrency_and_request_count(tmp_path):
    with fake_server(tmp_path) as server:
        server.start(30)
        results, wall = asyncio.run(run_concurrency(server.url + "/v1/completions", [{"prompt": "x"}], 3, 6, 10.0, 5.0))
    assert [r.index for r in results] == list(range(6)) and all(r.error is None for r in results)
    assert 0.7 < wall < 2.0                                      # two waves of three 0.4 s requests


# --- server lifecycle --------------------------------------------------------------------------------------------

def test_a_server_that_fails_to_start_is_an_error_and_leaves_no_process(tmp_path):
    server = fake_server(tmp_path, "--fail-start")
    with pytest.raises(ServerError, match="exited with code 3.*boom"), server:
        server.start(30)
    assert gone(server)


def test_a_server_that_never_gets_healthy_is_stopped(tmp_path):
    server = Server([sys.executable, "-c", "import time; time.sleep(60)"], free_port(), "/health", tmp_path / "server.log")
    with pytest.raises(ServerError, match="not ready after 1 s"), server:
        server.start(1)
    assert gone(server)


def test_stop_kills_the_whole_process_group(tmp_path):
    with fake_server(tmp_path, "--child") as server:
        server.start(30)
        time.sleep(0.3)
        assert group_alive(server.proc.pid)
    assert gone(server)                                          # the grandchild (sleep 120) went with it


def test_a_server_that_dies_mid_run_gives_a_recorded_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    servers: list[Server] = []

    def fake_server_for(entry, params, log_path):
        servers.append(Server([sys.executable, str(FAKE), str(port), "--die-after", "7"], port, "/health", log_path))
        return servers[0], "fake", {"engine": "fake"}

    rows = [{"id": f"r{i}", "summary": "s", "reference": "Hello world"} for i in range(2)]
    monkeypatch.setattr(serve, "server_for", fake_server_for)
    monkeypatch.setattr(serve, "payloads_for", lambda rows, params, entry, name: ([{"prompt": "x"}] * 2, rows, [5, 5]))
    monkeypatch.setattr(serve, "env_info", lambda: {})
    monkeypatch.setattr(serve, "quality", lambda records, offline, seed: {"served": len(records)})
    params = parse({"base": {"seed": 1, "model": "m"}, "serving": {"e": {"engine": "transformers"}},
              "serve": {"rates": [20, 40], "overload_share": 0.5, "concurrency": [2], "requests": 4, "max_duration_s": 5, "timeout_s": 5, "warmup_requests": 1,
                        "search_steps": 0, "search_min_gap": 0.15, "startup_timeout_s": 30, "slo": SLO | {"tpot_s": 0.5}}})
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows)
    assert result["failed"].startswith("ServerError: server exited with code 7 during rate 40")
    assert [lv["level"] for lv in result["levels"]] == ["rate 20", "rate 40"]      # what was measured is kept
    assert result["levels"][0]["ok"] == 4 and result["levels"][1]["errors"] >= 1   # 1 warm-up + 6 served, then it died
    assert len(records) == 8 and gone(servers[0])
    assert result["sustainable_rate"]["rate"] == 20


def test_unknown_entry_or_engine_is_an_input_error():
    from headline_bench.errors import InputError

    with pytest.raises(InputError, match="unknown serving entry 'y'; params.yaml serving: defines x"):
        serve.resolve_entry(parse({"base": {"model": "m"}, "serving": {"x": {"engine": "vllm"}}}), "y")
    with pytest.raises(InputError, match="^serving.x.engine = 'nope': should be 'transformers', 'llama_cpp' or 'vllm'$"):
        parse({"base": {"model": "m"}, "serving": {"x": {"engine": "nope"}}})
    assert serve.resolve_entry(parse({"base": {"model": "m"}, "serving": {"x": {"engine": "vllm"}}}), "x").model == "m"  # base.model by default


# --- a real server: `transformers serve` on a tiny random model ----------------------------------------------------

@pytest.mark.parametrize("cb", [False, True], ids=["plain", "continuous_batching"])
def test_transformers_serve_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, tiny_llama, cb):
    """The installed CLI's flags, the health check, streamed completions, the served records and the stop."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "tiny").symlink_to(tiny_llama)
    rows = [{"id": f"r{i}", "summary": f"Summary number {i} about a town.", "reference": "A headline"} for i in range(2)]
    entry = {"engine": "transformers", "continuous_batching": cb, "cb": {"num_blocks": 4, "max_batch_tokens": 256}, "reference": "none"}
    params = parse({"base": {"seed": 1, "model": "tiny", "device": "cpu", "dtype": "float32"}, "models": {"tiny": {"path": str(tiny_llama)}},
              "prompt": {"template": "Headline for: {summary}", "few_shot": []}, "generate": {"max_new_tokens": 6, "max_input_tokens": 256},
              "serving": {"e": entry}, "serve": {"rates": [4], "overload_share": 0.5, "concurrency": [2], "requests": 2, "max_duration_s": 5, "timeout_s": 30,
                                                 "warmup_requests": 2, "search_steps": 0, "search_min_gap": 0.15, "startup_timeout_s": 120, "slo": SLO}})
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows)
    assert "failed" not in result, result.get("failed")
    assert [lv["ok"] for lv in result["levels"]] == [2, 2] and len(records) == 4
    assert ("--continuous-batching" in result["server"]["argv"]) == cb and result["server"]["exit_code"] is not None
    assert result["prompt_tokens_match"] == [2, 2]                 # the server tokenized the offline prompt to as many tokens
    assert all(r["prediction"] is not None and r["ttft_s"] > 0 for r in records)
    assert len({r["prediction"] for r in records if r["id"] == "r0"}) == 1   # greedy: one headline per row
    assert (tmp_path / "metrics" / "serving" / "e" / "server.log").stat().st_size > 0


# --- serving report --------------------------------------------------------------------------------------------

def test_serving_report_table_recommendation_and_charts(tmp_path):
    from headline_bench.render import serving as serve_report
    from headline_bench.serving import summary as serving_summary

    def lv(kind, value, share, ttft=0.2):
        return {"level": f"{kind} {value:g}", "kind": kind, kind: value, "sent": 10, "ok": 10, "errors": 0, "timeouts": 0, "good": round(10 * share),
                "wall_s": 5.0, "request_throughput": 2.0, "output_token_throughput": 40.0, "goodput": 2.0 * share, "goodput_share": share,
                "ttft_s": summarize([ttft] * 10), "tpot_s": summarize([0.05] * 10), "itl_s": summarize([0.05] * 90), "e2e_s": summarize([1.0] * 10)}

    def result(engine, shares):
        levels = [lv("rate", r, s) for r, s in shares.items()] + [lv("concurrency", 1, 1.0)]
        return {"config": {"engine": engine, "reference": "kv_cache"}, "levels": levels, "sustainable_rate": sustainable_rate(levels, 0.99),
                "quality": {"rougeL": 0.2, "identical_to_offline": 9, "compared_to_offline": 10,
                            "first_difference": {"id": "r1", "level": "rate 1", "served": "A", "offline": "B"}}}

    results = {"fast": result("transformers", {1: 1.0, 2: 1.0, 4: 0.2}), "slow": result("llama_cpp_python", {1: 1.0, 2: 0.5}),
               "gpu": {"config": {"engine": "vllm"}, "skipped": "vLLM needs a CUDA GPU"},
               "dead": {"config": {"engine": "transformers"}, "failed": "ServerError: exited", "levels": []}}
    summary = serving_summary.summarize(list(results), results, SLO)
    assert summary["recommendation"]["choice"] == "fast" and summary["recommendation"]["runner_up"] == "slow"
    text = serve_report.render(summary, "serving_report/")
    assert "**Online serving: fast** (2 req/s (fails at 4" in text and "skipped: vLLM needs a CUDA GPU" in text and "failed: ServerError" in text
    assert "max 0.200 (n=10)" in text and "9/10 vs kv_cache" in text and "![Latency vs load](serving_report/latency_vs_load.png)" in text
    serve_report.write_charts(summary["entries"], SLO, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in (*serve_report.CHARTS, "latency_vs_load.json", "goodput_vs_rate.json"))
    assert serving_summary.recommend_online([summary["entries"][2]])["choice"] is None
