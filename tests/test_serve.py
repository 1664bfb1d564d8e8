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
from headline_bench.serving.goodput import (
    combine_runs,
    level_summary,
    meets_slo,
    next_rate,
    passes,
    requests_needed,
    summarize,
    sustainable_rate,
    verdict,
    wilson,
)
from headline_bench.serving.loadgen import poisson_arrivals, run_concurrency, run_rate, stream_request
from headline_bench.serving.server import PortTaken, Server, ServerError, free_port, group_alive
from headline_bench.settings import Score, Serve, parse

FAKE = Path(__file__).resolve().parent / "fake_openai_server.py"
SLO = {"ttft_s": 2.0, "tpot_s": 0.1, "share": 0.9, "confidence": 0.95}


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
            "tokens": 11, "error": error, "timed_out": timed_out, "headline": "" if error else "A headline"}


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


def levels(shares: dict[float, float], n: int = 100) -> list[dict]:
    """Rate levels of n requests each with the given good shares (and their Wilson intervals at 95%)."""
    return [{"rate": r, "goodput_share": s, "goodput_share_interval": wilson(round(s * n), n, 0.95)} for r, s in shares.items()]


def test_rate_search_bisects_the_pass_fail_bracket():
    measured = levels({1: 1.0, 2: 1.0, 4: 0.5})
    assert next_rate(measured, 0.9, min_gap=0.15) == 3
    measured += levels({3: 1.0})
    assert next_rate(measured, 0.9, min_gap=0.15) == 3.5     # bracket 3..4 is still 25% wide
    assert next_rate(measured, 0.9, min_gap=0.3) is None      # narrow enough
    sr = sustainable_rate(measured, 0.9)
    assert sr["rate"] == 3 and sr["bound"] == "measured" and sr["bracket"] == [3, 4]
    assert sr["interpolated"] == pytest.approx(3 + (1.0 - 0.9) / (1.0 - 0.5))


def test_rate_search_edges():
    assert sustainable_rate(levels({1: 1.0, 2: 1.0}), 0.9)["bound"] == "at least"
    assert next_rate(levels({1: 1.0, 2: 1.0}), 0.9, 0.15) is None
    none_pass = levels({1: 0.5, 2: 0.0})
    assert sustainable_rate(none_pass, 0.9) | {} == {"rate": None, "bound": "below", "bracket": [None, 1], "interpolated": None, "share": 0.9}
    assert next_rate(none_pass, 0.9, 0.15) == 0.5              # halve below the lowest failure
    assert sustainable_rate(levels({1: 1.0, 2: 0.5, 3: 1.0}), 0.9)["rate"] == 1   # a pass above a failure is not trusted
    assert sustainable_rate([{"concurrency": 1, "goodput_share": 1.0}], 0.9)["bound"] == "not measured"


def test_the_slo_share_is_claimed_only_as_far_as_n_shows_it():
    lo, hi = wilson(9, 10, 0.95)                                 # Wilson (1927), z = 1.645 (a 90% two-sided interval)
    assert (lo, hi) == (pytest.approx(0.6523, abs=1e-4), pytest.approx(0.9774, abs=1e-4))
    assert requests_needed(0.9, 0.95) == 25 and requests_needed(0.99, 0.95) == 268 and requests_needed(1.0, 0.95) is None
    assert wilson(25, 25, 0.95)[0] >= 0.9 > wilson(24, 24, 0.95)[0]   # 25 all good is the fewest that shows 90%
    ten_good = {"goodput_share": 1.0, "goodput_share_interval": wilson(10, 10, 0.95)}
    assert not passes(ten_good, 0.9) and verdict(ten_good, 0.9) == "undecided"  # 10/10 is no proof of 90%
    one_late = {"goodput_share": 24 / 25, "goodput_share_interval": wilson(24, 25, 0.95)}
    assert not passes(one_late, 0.9) and verdict(one_late, 0.9) == "undecided"
    bad = {"goodput_share": 0.2, "goodput_share_interval": wilson(5, 25, 0.95)}
    assert verdict(bad, 0.9) == "fail"
    assert passes({"goodput_share_interval": wilson(25, 25, 0.95)}, 0.9)
    lv = level_summary([req(0.5, 0.05)] * 25, 10.0, SLO)
    assert lv["good"] == 25 and lv["goodput_share_interval"][0] == pytest.approx(25 / (25 + 1.6448536 ** 2))


def test_the_sustainable_rate_comes_from_independent_runs_with_their_spread():
    run1 = sustainable_rate(levels({1: 1.0, 2: 1.0, 4: 0.3}), 0.9) | {"run": 1}
    run2 = sustainable_rate(levels({1: 1.0, 2: 0.5}), 0.9) | {"run": 2}
    both = combine_runs([run1, run2])
    assert both["rate"] == 1 and both["spread"] == [1, 2] and [r["run"] for r in both["runs"]] == [1, 2] and both["bound"] == "measured"
    never = combine_runs([run1, sustainable_rate(levels({1: 0.2}), 0.9)])
    assert never["rate"] is None and never["bound"] == "below"
    assert combine_runs([])["bound"] == "not measured"


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


def fake_entry(monkeypatch, *flags: str, token_prompts: bool = True, serve_settings: dict | None = None, first_port: int | None = None):
    """serve.serve wired to fake servers (a new one, on a new port, per start) and two rows; returns (params, rows, servers)."""
    from headline_bench.backends.base import ServerSpec

    servers: list[Server] = []

    def fake_server_for(entry, params, log_path):
        port = first_port if first_port and not servers else free_port()
        servers.append(Server([sys.executable, str(FAKE), str(port), *flags], port, "/health", log_path))
        return servers[-1], ServerSpec([], "/health", "fake", 1, token_prompts=token_prompts), {"engine": "fake", "port": port}

    def fake_payloads(rows, params, entry, spec):
        n = len(rows)
        return [{"prompt": [1, 2, 3] if spec.token_prompts else "x", "max_tokens": 8}] * n, rows, [[1, 2, 3]] * n, [False] * n

    rows = [{"id": f"r{i}", "summary": "s", "reference": "Hello world"} for i in range(2)]
    monkeypatch.setattr(serve, "server_for", fake_server_for)
    monkeypatch.setattr(serve, "payloads_for", fake_payloads)
    monkeypatch.setattr(serve, "env_info", lambda: {})
    params = parse({"base": {"seed": 1, "model": "m"}, "serving": {"e": {"engine": "transformers"}}, "generate": {"max_new_tokens": 8}, "score": {},
              "serve": {"rates": [20, 40], "overload_share": 0.5, "runs": 1, "concurrency": [2], "requests": 4, "max_duration_s": 5, "timeout_s": 5,
                        "warmup_requests": 1, "search_steps": 0, "search_min_gap": 0.15, "startup_timeout_s": 30,
                        "slo": SLO | {"tpot_s": 0.5}} | (serve_settings or {})})
    return params, rows, servers


def test_a_server_that_dies_mid_run_gives_a_recorded_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, rows, servers = fake_entry(monkeypatch, "--die-after", "7")
    monkeypatch.setattr(serve, "quality", lambda records, offline, seed: {"served": len(records)})
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows)
    assert result["failed"].startswith("ServerError: server exited with code 7 during run 1 rate 40")
    assert [lv["level"] for lv in result["levels"]] == ["run 1 rate 20", "run 1 rate 40"]      # what was measured is kept
    assert result["levels"][0]["ok"] == 4 and result["levels"][1]["errors"] >= 1   # 1 warm-up + 6 served, then it died
    assert result["levels"][1]["server_died"] and result["levels"][1]["verdict"] == "failed: server died" and not result["levels"][0]["server_died"]
    assert len(records) == 8 and gone(servers[0])
    assert result["sustainable_rate"]["runs"][0]["bracket"] == [None, 20]   # 4 good of 4 do not show 90%: no rate passed
    assert result["timing_lock"]["label"] == "serve e" and result["timing_lock"]["wait_s"] == 0  # the load levels held the timing lock


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
              "serving": {"e": entry}, "serve": {"rates": [4], "overload_share": 0.5, "runs": 1, "concurrency": [2], "requests": 2, "max_duration_s": 5, "timeout_s": 30,
                                                 "warmup_requests": 2, "search_steps": 0, "search_min_gap": 0.15, "startup_timeout_s": 120, "slo": SLO}})
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows, rows)
    assert "failed" not in result, result.get("failed")
    assert [r["level"] for r in records[:2]] == ["quality concurrency 1"] * 2 and result["prompt_check"]["server_counts_match_quality_rows"] == [2, 2]
    assert result["served_quality"] == {"quality_state": None, "note": "no offline quality pass to pair with (reference none)"}
    assert all(lv["client_floor"]["errors"] == 0 and lv["client_floor"]["ttft_s"]["p90"] < lv["ttft_s"]["p50"] for lv in result["levels"])
    records = records[2:]
    assert [lv["ok"] for lv in result["levels"]] == [2, 2] and len(records) == 4
    assert ("--continuous-batching" in result["server"]["argv"]) == cb and result["server"]["exit_code"] is not None
    assert result["prompt_check"]["server_counts_match"] == [2, 2]  # the server tokenized the offline prompt to as many tokens
    assert result["prompt_check"]["identical_ids"] == 2 and result["prompt_check"]["mode"].startswith("text")
    assert all(r["prediction"] is not None and r["ttft_s"] > 0 for r in records)
    assert len({r["prediction"] for r in records if r["id"] == "r0"}) == 1   # greedy: one headline per row
    assert (tmp_path / "metrics" / "serving" / "e" / "server.log").stat().st_size > 0


# --- serving report --------------------------------------------------------------------------------------------

def test_serving_report_table_recommendation_and_charts(tmp_path):
    from headline_bench.render import serving as serve_report
    from headline_bench.serving import summary as serving_summary

    def lv(kind, value, share, ttft=0.2, n=30):
        return {"level": f"{kind} {value:g}", "kind": kind, kind: value, "run": 1 if kind == "rate" else None, "sent": n, "ok": n, "errors": 0, "timeouts": 0,
                "good": round(n * share), "empty": 0, "wall_s": 5.0, "request_throughput": 2.0, "output_token_throughput": 40.0, "goodput": 2.0 * share,
                "goodput_share": share, "goodput_share_interval": wilson(round(n * share), n, 0.95), "ttft_s": summarize([ttft] * n),
                "tpot_s": summarize([0.05] * n), "itl_s": summarize([0.05] * 90), "e2e_s": summarize([1.0] * n),
                "verdict": verdict({"goodput_share_interval": wilson(round(n * share), n, 0.95)}, 0.9)}

    def result(engine, shares, deltas, equivalent=None):
        levels = [lv("rate", r, s) for r, s in shares.items()] + [lv("concurrency", 1, 1.0)]
        check = {"compared": 40, "identical": 40 if equivalent else 10, "near_tie": 0, "real_difference": 0 if equivalent else 30, "unclassified": 0}
        return {"config": {"engine": engine, "reference": "kv_cache"}, "levels": levels, "load": {"requests": 30}, "requests_needed": 25,
                "sustainable_rate": combine_runs([sustainable_rate(levels, 0.9) | {"run": 1}]),
                "prompt_check": {"mode": "token ids", "rows": 10, "identical_ids": 10, "differing_rows": []},
                "served_quality": {"reference": "baseline", "rougeL_deltas": deltas, "equivalence": equivalent, "token_check": check, "logprobs": True},
                "client_check": {"floor_ttft_s_p90_max": 0.002, "floor_itl_s_p90_max": 0.0001, "client_cpu_share_max": 0.05, "client_bound_levels": []},
                "quality": {"rougeL": 0.2, "first_difference": {"id": "r1", "level": "rate 1", "served": "A", "offline": "B"}}}

    rng = np.random.default_rng(0)
    results = {"fast": result("transformers", {1: 1.0, 2: 1.0, 4: 0.2}, [0.0] * 40, "equivalent to baseline up to float32 numerics (40 identical + 0 near-tie)"),
               "slow": result("llama_cpp_python", {1: 1.0, 2: 0.5}, list(rng.normal(0, 0.01, 40))),       # batching changed rows, not quality
               "garbage": result("transformers", {1: 1.0, 2: 1.0, 4: 1.0}, list(rng.normal(-0.3, 0.05, 40))),
               "gpu": {"config": {"engine": "vllm"}, "skipped": "vLLM needs a CUDA GPU"},
               "dead": {"config": {"engine": "transformers"}, "failed": "ServerError: exited", "levels": []}}
    summary = serving_summary.summarize(list(results), results, Serve(rates=[1], slo=SLO), Score())
    states = [(e.get("served_quality") or {}).get("quality_state") for e in summary["entries"]]
    assert states == ["equivalent", "non-inferior", "worse", None, None]
    assert summary["recommendation"]["choice"] == "fast" and summary["recommendation"]["runner_up"] == "slow"   # garbage is fastest, never picked
    assert summary["recommendation"]["eligible_by"] == "equivalent"
    assert summary["entries"][2]["ineligible"] == "served quality worse vs baseline"
    text = serve_report.render(summary, "serving_report/")
    assert "**Online serving: fast** (2 req/s (fails at 4" in text and "skipped: vLLM needs a CUDA GPU" in text and "failed: ServerError" in text
    assert "max 0.200 (n=30)" in text and "equivalent vs baseline: ΔROUGE-L +0.0000 (40 identical + 0 near-tie of 40)" in text
    assert "yes (equivalent)" in text and "yes (non-inferior)" in text and "no: served quality worse vs baseline" in text
    assert "2.0 / 0.10 ms; CPU ≤ 5% of a core; 0 client-bound" in text and "![Latency vs load](serving_report/latency_vs_load.png)" in text
    assert "30/30 = 1.00 [0.92, 1.00] pass" in text and "spread 2–2 req/s" in text and "10/10 (ids sent)" in text
    assert "Indicative" not in text
    results["fast"]["load"]["requests"] = 10
    assert "**Indicative only**: 10 requests per level cannot show it" in serve_report.render(serving_summary.summarize(list(results), results, Serve(rates=[1], slo=SLO), Score()))
    serve_report.write_charts(summary["entries"], SLO, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in (*serve_report.CHARTS, "latency_vs_load.json", "goodput_vs_rate.json"))
    assert serving_summary.recommend_online([summary["entries"][3]])["choice"] is None
    assert serving_summary.recommend_online([summary["entries"][2]])["note"].startswith("no entry that ran is eligible")


# --- issue 18 probes: garbage, empty answers, a port someone else holds, grandchildren, control strings -----------

@pytest.mark.parametrize("text, headline", [("zzz zzz\n", "zzz zzz"), ("\n", ""), ("", "")], ids=["garbage", "newline", "empty"])
def test_goodput_counts_only_real_headlines_and_garbage_is_never_picked(tmp_path, monkeypatch, text, headline):
    """A server that streams garbage at once is fast but its served quality is worse than offline, so it is never
    picked; newline-only or empty streams are empty headlines (not errors) and never good."""
    from headline_bench.serving import summary as serving_summary

    monkeypatch.chdir(tmp_path)
    params, rows, _ = fake_entry(monkeypatch, "--fast", "--text", text, serve_settings={"rates": [20], "requests": 25, "concurrency": []})
    quality_rows, offline = offline_set(32)
    monkeypatch.setattr("headline_bench.serving.served_quality.offline_quality", lambda params, entry: ("ref", offline))
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows, quality_rows)
    lv = result["levels"][0]
    assert "failed" not in result and lv["errors"] == 0 and lv["ok"] == 25        # an empty finished stream is not an error
    assert {r["prediction"] for r in records} == {headline}
    assert lv["good"] == (25 if headline else 0) and lv["empty"] == (0 if headline else 25)
    summary = serving_summary.summarize(["e"], {"e": result}, params.serve, params.score)
    assert summary["entries"][0]["served_quality"]["quality_state"] == "worse"
    assert summary["entries"][0]["ineligible"] == "served quality worse vs ref" and summary["recommendation"]["choice"] is None


def offline_set(n: int, prediction: str = "Hello world", token_ids: list[int] | None = None, margins: list[float] | None = None):
    """n quality rows whose reference headline is "Hello world", and an offline reference's records for them."""
    rows = [{"id": f"q{i}", "summary": "s", "reference": "Hello world"} for i in range(n)]
    offline = [{"id": r["id"], "reference": r["reference"], "prediction": prediction, "token_ids": token_ids or [100, 101, 102],
                "margins": margins or [5.0, 5.0, 5.0]} for r in rows]
    return rows, offline


def test_a_port_taken_by_another_process_is_detected_and_retried_on_a_new_port(tmp_path, monkeypatch):
    """Another process answers the health check on the server's port first: the start is refused (its socket is
    not the server's) and the stage retries on a new port, so the served text is the server's own."""
    monkeypatch.chdir(tmp_path)
    squatter_port = free_port()
    squatter = Server([sys.executable, str(FAKE), str(squatter_port), "--fast", "--text", "zzz zzz\n"], squatter_port, "/health", tmp_path / "squat.log")
    with squatter:
        squatter.start(30)
        ours = Server([sys.executable, str(FAKE), str(squatter_port)], squatter_port, "/health", tmp_path / "ours.log")
        with pytest.raises(PortTaken), ours:
            ours.start(30)
        assert gone(ours)
        # the first start lands on the squatter's port
        params, rows, servers = fake_entry(monkeypatch, serve_settings={"rates": [5], "concurrency": []}, first_port=squatter_port)
        monkeypatch.setattr(serve, "quality", lambda records, offline, seed: {"served": len(records)})
        result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows)
    assert "failed" not in result and result["server"]["port_attempts"] == 2 and result["server"]["port"] != squatter_port
    assert {r["raw"] for r in records} == {"Hello world\n"} and all(gone(s) for s in servers)


def test_a_killed_stage_leaves_no_grandchild(tmp_path):
    """SIGKILL of the stage: the group leader ends the server and the process the server started."""
    import os
    import re
    import signal
    import subprocess

    port = free_port()
    stage = tmp_path / "stage.py"
    stage.write_text(f"""import sys, time
from headline_bench.serving.server import Server
s = Server([sys.executable, {str(FAKE)!r}, '{port}', '--child'], {port}, '/health', __import__('pathlib').Path({str(tmp_path / 'server.log')!r}))
s.start(30)
print(s.proc.pid, flush=True)
time.sleep(120)
""")
    proc = subprocess.Popen([sys.executable, str(stage)], stdout=subprocess.PIPE, text=True)
    leader = int(proc.stdout.readline())
    child = int(re.search(r"child pid (\d+)", (tmp_path / "server.log").read_text()).group(1))
    assert os.getpgid(child) == leader                          # the grandchild is in the leader's group
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and group_alive(leader):
        time.sleep(0.1)
    assert not group_alive(leader)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_served_prompts_equal_offline_prompts_by_token_ids(tiny_llama, tmp_path, monkeypatch):
    """A summary holding `</s>`: sent as ids it reaches the server as the offline ids; sent as text to an engine
    that parses special tokens it becomes EOS, and the row is found, marked and never counted as identical."""
    from headline_bench.backends.base import ServerSpec
    from headline_bench.backends.transformers import serve_tokenize

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "tiny").symlink_to(tiny_llama)
    rows = [{"id": "clean", "summary": "A town votes.", "reference": "r"}, {"id": "eos", "summary": "A town </s> votes.", "reference": "r"}]
    params = parse({"base": {"model": "tiny"}, "prompt": {"template": "Headline for: {summary}", "few_shot": []},
                    "generate": {"max_new_tokens": 6, "max_input_tokens": 256}, "serving": {"e": {"engine": "transformers"}}})
    entry = serve.resolve_entry(params, "e")
    text_spec = ServerSpec([], "/health", "m", 1, token_prompts=False, text_ids=serve_tokenize(tiny_llama))
    bodies, kept, ids, differs = serve.payloads_for(rows, params, entry, text_spec)
    assert differs == [False, True] and all(isinstance(b["prompt"], str) for b in bodies)
    assert 2 in text_spec.text_ids(bodies[1]["prompt"]) and 2 not in ids[1]   # the server would see EOS; offline saw the bytes
    id_spec = ServerSpec([], "/health", "m", 1, token_prompts=True)
    bodies, _, ids2, differs = serve.payloads_for(rows, params, entry, id_spec)
    assert differs == [False, False] and [b["prompt"] for b in bodies] == ids2 == ids
    records = [{"id": r, "level": "rate 1", "prediction": "Same", "reference": "r", "prompt_differs": r == "eos"} for r in ("clean", "eos")]
    monkeypatch.setattr("headline_bench.quality.rouge.rouge", lambda preds, refs, seed: {"rougeL": 0.0})
    q = serve.quality(records, [{"id": "clean", "prediction": "Same"}, {"id": "eos", "prediction": "Same"}], 0)
    assert (q["identical_to_offline"], q["rows_identical"], q["rows_compared"], q["prompt_differs_rows"]) == (1, 1, 2, ["eos"])
    check = serve.prompt_check(text_spec, ids, [False, True], kept, [])
    assert check["identical_ids"] == 1 and check["differing_rows"] == ["eos"]


# --- issue 30: served quality by the offline rule, goodput on the offline prompt, the client's own floor ----------

def served_run(monkeypatch, tmp_path, *flags: str, offline: list[dict], quality_request: dict | None = None, serve_settings: dict | None = None,
               fast: bool = True, served_rows: int | None = None):
    """serve.serve against the fake server (answering at once unless `fast` is false) with the quality rows of `offline`, the first
    two of them timed; returns (result, records, summary)."""
    from headline_bench.serving import summary as serving_summary

    monkeypatch.chdir(tmp_path)
    params, _, servers = fake_entry(monkeypatch, *(["--fast"] if fast else []), *flags, serve_settings={"rates": [20], "requests": 4, "concurrency": []} | (serve_settings or {}))
    params.serving["e"] = params.serving["e"].model_copy(update={"quality_request": quality_request or {}})
    monkeypatch.setattr("headline_bench.serving.served_quality.offline_quality", lambda params, entry: ("ref", offline))
    quality_rows = [{"id": r["id"], "summary": "s", "reference": r["reference"]} for r in offline]
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, quality_rows[:2], quality_rows[:served_rows])  # timed rows: the first quality rows
    assert all(gone(s) for s in servers)
    return result, records, serving_summary.summarize(["e"], {"e": result}, params.serve, params.score)


@pytest.mark.parametrize("offline_prediction, offline_ids, margins, logprobs, state, counts", [
    ("Hello world", [100, 101, 102], None, False, "equivalent", (32, 0, 0, 0)),          # every row identical
    ("Hello there", [100, 999, 102], [5.0, 1e-7, 5.0], True, "equivalent", (0, 32, 0, 0)),   # ids from logprobs: a near-tie at step 1
    ("Hello there", [100, 999, 102], [5.0, 1e-7, 5.0], False, "non-inferior", (0, 0, 0, 32)),  # no logprobs: unclassifiable, so ROUGE decides
    ("Hello there", [100, 999, 102], [5.0, 5.0, 5.0], True, "non-inferior", (0, 0, 32, 0)),   # a real difference, better ROUGE
], ids=["identical", "near-tie-by-logprobs", "no-logprobs", "real-difference"])
def test_served_quality_pairs_every_quality_row_with_the_offline_reference(tmp_path, monkeypatch, offline_prediction, offline_ids, margins,
                                                                             logprobs, state, counts):
    """Every quality row is served once at concurrency 1 and decided by the offline rule: equivalent when identical or
    a near-tie by the lossless check (token ids only where the server returns logprobs), else the paired ROUGE-L test;
    the pick then rests on that state, and the report says which."""
    from headline_bench.render.serving import render

    _, offline = offline_set(32, offline_prediction, offline_ids, margins)
    result, records, summary = served_run(monkeypatch, tmp_path, offline=offline, quality_request={"logprobs": 2} if logprobs else None)
    served = [r for r in records if r["level"] == "quality concurrency 1"]
    assert "failed" not in result and len(served) == 32 and {r["id"] for r in served} == {r["id"] for r in offline}
    assert all(r["token_ids"] == ([100, 101, 102] if logprobs else None) for r in served)      # up to and with the stop's chunk
    sq = summary["entries"][0]["served_quality"]
    c = sq["token_check"]
    assert (c["identical"], c["near_tie"], c["real_difference"], c["unclassified"]) == counts
    assert sq["quality_state"] == state and sq["reference"] == "ref" and sq["rows"] == 32 and sq["logprobs"] == logprobs
    if state == "non-inferior":
        assert sq["rougeL_delta"] == pytest.approx(0.5) and sq["quality_note"] == "significantly above the reference" and sq["comparisons"] == 1
    assert summary["entries"][0]["ineligible"] is None
    assert f"yes ({state})" in render(summary)


def test_served_quality_on_the_first_rows_pairs_only_those(tmp_path, monkeypatch):
    """serve.quality.rows: the stage serves the first quality rows only, and the offline rows beyond them are not
    counted as unserved (else no entry could be equivalent)."""
    _, offline = offline_set(40)
    result, records, summary = served_run(monkeypatch, tmp_path, offline=offline, served_rows=30)
    sq = summary["entries"][0]["served_quality"]
    assert len([r for r in records if r["level"] == "quality concurrency 1"]) == 30
    assert sq["rows"] == 30 and sq["token_check"]["not_served"] == [] and sq["quality_state"] == "equivalent"


def test_a_row_not_served_or_sent_otherwise_never_counts_as_identical():
    """Served quality cannot be helped by leaving rows out or by answering another prompt: both score 0 and are unclassified."""
    from headline_bench.quality.fidelity import near_tie_threshold
    from headline_bench.serving.served_quality import served_quality
    from headline_bench.serving.summary import decide

    _, offline = offline_set(32)
    served = [{"id": r["id"], "reference": r["reference"], "prediction": "Hello world", "token_ids": [100, 101, 102], "level": "q"} for r in offline]
    served[0]["prompt_mismatch"] = True     # its prompt reached the server as other token ids
    del served[1]                            # never answered (an error or a time-out drops out of the records' predictions)
    threshold, rule = near_tie_threshold("float32", "cpu", {}, 4)
    pairing = served_quality(served, offline, "ref", threshold, rule, "float32")
    c = pairing["token_check"]
    assert (c["identical"], c["unclassified"], c["compared"]) == (30, 2, 32) and pairing["equivalence"] is None
    assert sorted(pairing["rougeL_deltas"]) == [-1.0, -1.0] + [0.0] * 30 and pairing["prompt_mismatch_rows"] == ["q0"]
    assert decide(pairing, 1, Score())["quality_state"] == "inconclusive"       # 2 of 32 rows lost: not shown within one ROUGE point
    fixed = [s | {"prompt_mismatch": False} for s in served]
    all_same = served_quality(fixed + [fixed[0] | {"id": "q1"}], offline, "ref", threshold, rule, "float32")
    assert decide(all_same, 1, Score())["quality_state"] == "equivalent"


def test_a_prompt_the_server_counts_differently_is_never_good(tmp_path, monkeypatch):
    """The server counts one prompt token more than offline (a BOS of its own): fast, non-empty answers, none good."""
    _, offline = offline_set(32)
    result, records, summary = served_run(monkeypatch, tmp_path, "--prompt-extra", "1", offline=offline)
    lv = result["levels"][0]
    assert "failed" not in result and lv["ok"] == lv["sent"] == 4 and lv["empty"] == 0
    assert lv["prompt_mismatch"] == 4 and lv["good"] == 0 and lv["verdict"] == "fail"
    assert result["prompt_check"]["server_counts_match_quality_rows"] == [0, 32]
    assert all(r["prompt_mismatch"] for r in records)
    assert summary["entries"][0]["served_quality"]["quality_state"] == "worse"   # other prompts score 0: never identical, never better


def test_goodput_needs_the_offline_prompt_and_a_living_server():
    ok = req(0.5, 0.05)
    assert meets_slo(ok, SLO) and not meets_slo(ok | {"prompt_mismatch": True}, SLO)
    lv = level_summary([ok] * 30 + [ok | {"prompt_mismatch": True}] * 2, 10.0, SLO)
    assert (lv["good"], lv["prompt_mismatch"]) == (30, 2)
    perfect = {"rate": 4, "goodput_share": 1.0, "goodput_share_interval": wilson(30, 30, 0.95)}
    assert passes(perfect, 0.9) and not passes(perfect | {"server_died": True}, 0.9)
    assert verdict(perfect | {"server_died": True}, 0.9) == "failed: server died"
    search = levels({1: 1.0, 2: 1.0}) + [perfect | {"server_died": True}]
    assert sustainable_rate(search, 0.9)["bracket"] == [2, 4]                   # the level the server died in is a failed level


def test_client_cpu_and_a_client_bound_level_that_never_passes():
    from headline_bench.serving.client_check import client_bound, cpu_facts, mark, timed

    async def busy():
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        return [], 0.3

    _, wall, cpu = timed(busy())
    facts = cpu_facts(cpu, max(wall, 0.3), 3)
    assert cpu >= 0.3 and facts["client_cpu_s_per_request"] == pytest.approx(cpu / 3) and facts["client_cpu_share"] > 0.5
    level = {"level": "rate 4", "kind": "rate", "rate": 4, "goodput_share": 1.0, "goodput_share_interval": wilson(30, 30, 0.95), "client_cpu_share": 0.1}
    assert client_bound(level, None, SLO, 0.5, 0.1) is None
    assert client_bound(level | {"client_cpu_share": 0.7}, None, SLO, 0.5, 0.1) == "the client used 70% of a core (limit 50%)"
    slow_client = {"ttft_s": {"p90": 0.3}, "tpot_s": {"p90": 0.001}}
    assert client_bound(level, slow_client, SLO, 0.5, 0.1).startswith("the client's own P90 TTFT 300.0 ms is >= 10% of the SLO's 2000 ms")
    lvs = levels({1: 1.0, 2: 1.0}, n=30) + [level]
    for lv in lvs:
        lv["kind"] = "rate"
    mark(lvs, {("rate", 4): slow_client}, SLO, 0.9, 0.5, 0.1)
    assert lvs[2]["verdict"] == "failed: client-bound" and not passes(lvs[2], 0.9) and lvs[0]["verdict"] == "pass"
    assert sustainable_rate(lvs, 0.9)["bracket"] == [2, 4]


def test_the_null_server_floor_is_the_clients_own_latency(tmp_path):
    """Against the null server (instant, the same token counts) the client measures only itself: every request gets
    its row's token count, and TTFT and ITL are loopback-and-parsing small."""
    from headline_bench.serving.client_check import calibrate, null_payloads

    payloads = null_payloads([{"prompt": [1, 2, 3], "max_tokens": 24}] * 3, [5, 7, 1])
    assert [p["max_tokens"] for p in payloads] == [5, 7, 1]
    seen: list[list] = []

    def replay(url, kind, value):
        async def go():
            results, wall = await (run_rate(url, payloads, value, 12, 1, 5.0, 5.0) if kind == "rate" else run_concurrency(url, payloads, int(value), 12, 5.0, 5.0))
            seen.append(results)
            return results, wall
        return go()

    floors = calibrate([("concurrency", 2), ("rate", 50.0)], replay)
    assert set(floors) == {("concurrency", 2), ("rate", 50.0)}
    assert all(r.error is None and r.tokens == [5, 7, 1][r.index % 3] for results in seen for r in results)
    for f in floors.values():
        assert f["sent"] == 12 and f["errors"] == 0 and f["ttft_s"]["p90"] < 0.1 and f["itl_s"]["p90"] < 0.02 and f["client_cpu_s"] > 0
    # from the heaviest level down: a clear floor bounds the lighter levels of its kind, which are not replayed
    seen.clear()
    keys = [("rate", 10.0), ("rate", 50.0), ("rate", 25.0), ("concurrency", 1), ("concurrency", 2)]
    floors = calibrate(keys, replay, clear=lambda f: f["measured_at"] != "rate 50")
    assert len(seen) == 3 and set(floors) == set(keys)
    assert [floors[k]["measured_at"] for k in keys] == ["rate 25", "rate 50", "rate 25", "concurrency 2", "concurrency 2"]


@pytest.mark.parametrize("max_floor_share, bound", [(0.1, False), (0.0, True)], ids=["server-bound", "client-bound"])
def test_every_level_carries_the_client_check(tmp_path, monkeypatch, max_floor_share, bound):
    """The stage replays each level against the null server; the client's floor lies far below the scripted server's
    0.2 s TTFT. With a floor share of 0 every level is client-bound and no rate passes, whatever its goodput share."""
    _, offline = offline_set(32 if bound else 2)   # the scripted server takes 0.5 s a row: 2 quality rows are enough here
    client = {"calibrate": True, "max_cpu_share": 0.5, "max_floor_share": max_floor_share}
    result, _, summary = served_run(monkeypatch, tmp_path, offline=offline, fast=bound,
                                    serve_settings={"requests": 25, "rates": [5], "max_duration_s": 10, "client": client})
    lv = result["levels"][0]
    assert "failed" not in result and lv["good"] == 25 and lv["client_cpu_s"] > 0 and lv["client_cpu_share"] < 0.5
    assert lv["client_floor"]["sent"] == 25 and lv["client_floor"]["ttft_s"]["p90"] < 0.1 and (bound or lv["ttft_s"]["p50"] > 0.18)
    assert bool(lv["client_bound"]) == bound and (lv["verdict"] == "failed: client-bound") == bound
    assert result["client_check"]["client_bound_levels"] == (["run 1 rate 5"] if bound else [])
    assert result["sustainable_rate"]["bound"] == ("below" if bound else "at least")
    assert summary["entries"][0]["sustainable_rate"]["rate"] == (None if bound else 5)
    if bound:   # equivalent served quality, every request good: still never picked
        assert summary["entries"][0]["served_quality"]["quality_state"] == "equivalent" and summary["recommendation"]["choice"] is None


def test_the_quality_rows_again_at_the_sustainable_rate(tmp_path, monkeypatch):
    """serve.quality.at_sustainable_rate: every quality row once more at the sustainable rate, decided apart."""
    _, offline = offline_set(32)
    result, records, summary = served_run(monkeypatch, tmp_path, offline=offline, serve_settings={"requests": 25, "quality": {"at_sustainable_rate": True}})
    assert result["sustainable_rate"]["rate"] == 20 and sum(r["level"] == "quality rate 20" for r in records) == 32
    sq = summary["entries"][0]["served_quality"]
    assert sq["quality_state"] == "equivalent" and sq["at_rate"]["quality_state"] == "equivalent" and sq["at_rate"]["rows"] == 32
    from headline_bench.render.serving import render

    assert "Served quality at the sustainable rate (every quality row once more, under load): equivalent vs ref" in render(summary)


def test_token_ids_and_logprob_gaps_from_each_servers_logprobs():
    """llama-server's `content` entries name ids; OpenAI's legacy form names them only as vLLM's "token_id:N"
    (return_tokens_as_token_ids); other strings give no ids, so those rows are compared as headlines."""
    from headline_bench.serving.loadgen import token_logprobs

    llama = {"choices": [{"text": "Hi", "logprobs": {"content": [{"id": 7, "token": "Hi", "logprob": -0.1,
                                                                   "top_logprobs": [{"id": 7, "logprob": -0.1}, {"id": 9, "logprob": -1.6}]}]}}]}
    vllm = {"choices": [{"text": "Hi", "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.1],
                                                     "top_logprobs": [{"token_id:7": -0.1, "token_id:9": -1.6}]}}]}
    legacy = {"choices": [{"text": "Hi", "logprobs": {"tokens": ["Hi"], "token_logprobs": [-0.1], "top_logprobs": [{"Hi": -0.1}]}}]}
    assert token_logprobs(llama) == token_logprobs(vllm) == [(7, pytest.approx(1.5))]
    assert token_logprobs(legacy) == [(None, None)] and token_logprobs({"choices": [{"text": "Hi"}]}) == []


def test_a_disabled_entry_is_a_recorded_skip_that_starts_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, rows, servers = fake_entry(monkeypatch)
    params.serving["e"] = params.serving["e"].model_copy(update={"enabled": False})
    result, records = serve.serve("e", serve.resolve_entry(params, "e"), params, rows, rows)
    assert servers == [] and records == [] and "serving.e.enabled: false" in result["skipped"] and "-S serving.e.enabled=true" in result["skipped"]
