"""The serving report: markdown and charts of metrics/serving_report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headline_bench.files import write_json
from headline_bench.render.markdown import table

CHARTS = ("latency_vs_load.png", "goodput_vs_rate.png")


def fmt(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def dist(d: dict[str, Any] | None, spec: str = ".3f") -> str:
    """mean / P50 / P90 / P99 (n), with the maximum in place of P99 below 100 samples."""
    if not d or not d.get("n"):
        return "—"
    top = f"P99 {fmt(d['p99'], spec)}" if "p99" in d else f"max {fmt(d.get('max'), spec)}"
    return f"{fmt(d.get('mean'), spec)} / {fmt(d.get('p50'), spec)} / {fmt(d.get('p90'), spec)} / {top} (n={d['n']})"


def runs_text(sr: dict[str, Any] | None) -> str:
    """The sustainable rate over the independent runs: the lowest, then each run's rate and the spread."""
    if not sr or not sr.get("runs"):
        return rate_text(sr)
    each = ", ".join(f"run {r.get('run')}: {rate_text(r)}" for r in sr["runs"])
    spread = f"; spread {fmt(sr['spread'][0], 'g')}–{fmt(sr['spread'][1], 'g')} req/s" if sr.get("spread") else ""
    return f"{rate_text(sr)} [{each}{spread}]"


def share_text(lv: dict[str, Any]) -> str:
    """good/sent = share [Wilson interval], the level's verdict."""
    iv = lv.get("goodput_share_interval")
    interval = f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""
    return f"{lv.get('good')}/{lv.get('sent')} = {fmt(lv.get('goodput_share'), '.2f')}{interval} {lv.get('verdict', '')}".strip()


def prompt_text(r: dict[str, Any]) -> str:
    pc = r.get("prompt_check") or {}
    if not pc.get("rows"):
        return "—"
    how = "ids sent" if str(pc.get("mode", "")).startswith("token ids") else "text, re-tokenized"
    listed = f"; differ: {', '.join(map(str, pc['differing_rows'][:5]))}" if pc.get("differing_rows") else ""
    return f"{pc['identical_ids']}/{pc['rows']} ({how}{listed})"


def served_text(r: dict[str, Any]) -> str:
    """The served quality state vs the offline reference, with the paired ΔROUGE-L interval or the equivalence counts."""
    sq = r.get("served_quality") or {}
    if not sq.get("quality_state"):
        return f"— ({sq['note']})" if sq.get("note") else "—"
    c = sq.get("token_check") or {}
    how = f"{c.get('identical')} identical + {c.get('near_tie')} near-tie of {c.get('compared')}" + ("" if sq.get("logprobs") else ", no logprobs")
    low, high = sq.get("rougeL_delta_low"), sq.get("rougeL_delta_high")
    interval = f" [{fmt(low, '+.4f')}, {fmt(high, '+.4f')}]" if low is not None else ""
    return f"{sq['quality_state']} vs {sq.get('reference')}: ΔROUGE-L {fmt(sq.get('rougeL_delta'), '+.4f')}{interval} ({how})"


def floor_text(r: dict[str, Any]) -> str:
    """The client's own worst P90 TTFT / ITL against the null server, its highest CPU share, and the client-bound levels."""
    cc = r.get("client_check") or {}
    if cc.get("error"):
        return f"not measured ({cc['error']})"
    if not cc:
        return "—"
    bound = len(cc.get("client_bound_levels") or [])
    return (f"{fmt(1000 * (cc.get('floor_ttft_s_p90_max') or 0), '.1f')} / {fmt(1000 * (cc.get('floor_itl_s_p90_max') or 0), '.2f')} ms; "
            f"CPU ≤ {fmt(100 * (cc.get('client_cpu_share_max') or 0), '.0f')}% of a core; {bound} client-bound")


def client_text(lv: dict[str, Any]) -> str:
    """One level's client cost and floor, and why it is client-bound where it is."""
    f = lv.get("client_floor") or {}
    floor = f"; floor {fmt(1000 * f['ttft_s']['p90'], '.1f')} / {fmt(1000 * (f['itl_s'].get('p90') or 0), '.2f')} ms" if (f.get("ttft_s") or {}).get("p90") is not None else ""
    cpu = f"{fmt(1000 * (lv.get('client_cpu_s_per_request') or 0), '.1f')} ms, {fmt(100 * (lv.get('client_cpu_share') or 0), '.0f')}%" if "client_cpu_share" in lv else "—"
    return cpu + floor + (f"; **client-bound**: {lv['client_bound']}" if lv.get("client_bound") else "")


def rate_text(sr: dict[str, Any] | None) -> str:
    if not sr or sr.get("bound") == "not measured":
        return "—"
    lo, hi = sr.get("bracket") or [None, None]
    if sr["bound"] == "below":
        return f"< {fmt(hi, 'g')} req/s (the lowest rate tried failed)"
    if sr["bound"] == "at least":
        return f"≥ {fmt(lo, 'g')} req/s (no rate tried failed)"
    est = f", ~{sr['interpolated']:.2f} interpolated" if isinstance(sr.get("interpolated"), float) else ""
    return f"{fmt(lo, 'g')} req/s (fails at {fmt(hi, 'g')}{est})"


def render(summary: dict[str, Any], link_prefix: str = "") -> str:
    """The serving section as markdown; `link_prefix` points the chart links at metrics/serving_report/ from where the text lives."""
    slo, rows, rec = summary["slo"], summary["entries"], summary["recommendation"]
    head = ["Entry", "Engine (knobs)", "Sustainable rate (lowest run) [each run; spread]", "P50 TTFT / TPOT at lowest rate (s)", "Max goodput (req/s)",
            "Max output tok/s", "Served quality (every quality row, concurrency 1)", "Prompt ids = offline",
            "Client floor: P90 TTFT / ITL (null server)", "Eligible"]
    body = []
    for r in rows:
        if r.get("status") != "ran" and not r.get("levels"):
            body.append([r["entry"], f"{r.get('engine')} ({r.get('knobs')})", f"{r['status']}: {r.get('reason')}"] + ["—"] * 7)
            continue
        status = "" if r["status"] == "ran" else f" ({r['status']}: {r.get('reason')})"
        body.append([r["entry"], f"{r.get('engine')} ({r.get('knobs')})", runs_text(r.get("sustainable_rate")) + status,
                     f"{fmt(r.get('ttft_s_p50_low'))} / {fmt(r.get('tpot_s_p50_low'), '.4f')} @ {fmt(r.get('low_rate'), 'g')}",
                     fmt(r.get("max_goodput"), ".2f"), fmt(r.get("max_output_token_throughput"), ".1f"), served_text(r), prompt_text(r), floor_text(r),
                     f"yes ({(r.get('served_quality') or {}).get('quality_state')})" if r["status"] == "ran" and not r.get("ineligible")
                     else f"no: {r.get('ineligible') or r['status']}"])
    pick = (f"**Online serving: {rec['choice']}** ({rate_text(next(r for r in rows if r['entry'] == rec['choice'])['sustainable_rate'])}"
            + (f"; runner-up {rec['runner_up']}" if rec.get("runner_up") else "") + f"). Rule: {rec['rule']}."
            if rec.get("choice") else "**Online serving: none.**") + (f" Note: {rec['note']}." if rec.get("note") else "")
    conf = slo.get("confidence", 0.95)
    needed = next((r.get("requests_needed") for r in rows if r.get("requests_needed")), None)
    per_level = next((r.get("requests_per_level") for r in rows if r.get("requests_per_level")), None)
    claim = (f"A level passes when the lower end of the Wilson interval of its good share (a one-sided {conf:.0%} bound) clears "
             f"{slo['share']:.0%}; that needs at least {needed} requests, every one good." if needed else "")
    if needed and per_level and per_level < needed:
        claim += f" **Indicative only**: {per_level} requests per level cannot show it, so no level can pass (raise serve.requests)."
    client = summary.get("client") or {}
    parts = [f"SLO: a request is good when it returns a non-empty headline to the offline prompt (the same token ids; the server's own prompt-token "
             f"count, where it reports one, equal to the offline count) with TTFT ≤ {slo['ttft_s']:g} s and TPOT ≤ {slo['tpot_s'] * 1000:g} ms "
             f"(errors, time-outs, empty headlines and other prompts count as misses); the SLO asks {slo['share']:.0%} of the requests sent to be good. "
             f"{claim} A level during which the server died is failed; so is a client-bound one: the client used "
             f"{client.get('max_cpu_share', 0.5):.0%} of a core over it, or, replayed against a null server (instant answers of the same token "
             f"counts on 127.0.0.1), its own P90 TTFT or TPOT reached {client.get('max_floor_share', 0.1):.0%} of the SLO limit. "
             "The sustainable rate is searched in independent runs (own arrival schedules); the lowest is reported, with each run's and the "
             "spread. Served quality: every quality row served once at concurrency 1 and paired with the offline reference technique's quality "
             "pass on the same rows; equivalent when every row is identical or a near-tie by the lossless check (token ids where the server returns "
             "logprobs), else the offline rule on per-row ΔROUGE-L (paired t, a family of the serving entries, Bonferroni): non-inferior, worse, "
             "inconclusive. An entry is eligible for the pick only when equivalent or non-inferior. TTFT: request sent to the first streamed chunk "
             "with text; ITL: every gap between consecutive text chunks (a multi-token chunk is one gap); TPOT: (E2E − TTFT) / (chunks − 1), "
             "MLPerf's definition; E2E: request sent to the last text chunk (the stop). Percentiles: numpy linear; below 100 samples the maximum is "
             "shown instead of P99.", table(head, body), pick]
    for r in rows:
        if not r.get("levels"):
            continue
        lv_rows = [[lv["level"], f"{lv['ok']}/{lv['sent']}", f"{lv['errors']}/{lv['timeouts']}", dist(lv.get("ttft_s")), dist(lv.get("itl_s"), ".4f"),
                    dist(lv.get("tpot_s"), ".4f"), dist(lv.get("e2e_s")), fmt(lv["request_throughput"], ".2f"), fmt(lv["output_token_throughput"], ".1f"),
                    fmt(lv["goodput"], ".2f"), f"{lv.get('empty', '—')}/{lv.get('prompt_mismatch', '—')}", client_text(lv), share_text(lv)] for lv in r["levels"]]
        parts += [f"### {r['entry']}", table(["Level", "OK/sent", "Errors/time-outs", "TTFT s: mean / P50 / P90 / P99", "ITL s", "TPOT s", "E2E s",
                                              "Req/s", "Tok/s", "Goodput req/s", "Empty headlines / other prompts",
                                              "Client: CPU per request, share of a core; floor P90 TTFT / ITL",
                                              f"Good share [Wilson, {conf:.0%} one-sided ends]"], lv_rows)]
        at_rate = (r.get("served_quality") or {}).get("at_rate")
        if at_rate:
            parts.append(f"Served quality at the sustainable rate (every quality row once more, under load): {served_text({'served_quality': at_rate})}.")
        if r.get("first_difference"):
            d = r["first_difference"]
            why = " (its served prompt differs from the offline prompt by token ids)" if d.get("prompt_differs") else ""
            parts.append(f"First served headline that differs from {r['offline_reference']} (`{d['id']}`, {d['level']}){why}: "
                         f"\"{d['served']}\" vs \"{d['offline']}\".")
    parts += [f"![Latency vs load]({link_prefix}{CHARTS[0]})", f"![Goodput vs rate]({link_prefix}{CHARTS[1]})"]
    return "\n\n".join(parts)


def write_charts(rows: list[dict[str, Any]], slo: dict[str, Any], out: Path) -> None:
    """Latency vs load (rates and concurrency levels) and goodput vs rate, as PNGs and dvc plots data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r.get("levels")]
    lat = [{"entry": r["entry"], "rate": lv["rate"], **{f"{m}_{p}": (lv.get(m) or {}).get(p) for m in ("ttft_s", "tpot_s", "e2e_s") for p in ("p50", "p90")}}
           for r in ran for lv in r["levels"] if lv.get("rate") is not None]
    good = [{"entry": r["entry"], "rate": lv["rate"], "goodput_share": lv["goodput_share"], "goodput": lv["goodput"]}
            for r in ran for lv in r["levels"] if lv.get("rate") is not None]
    write_json(out / "latency_vs_load.json", {"latency": sorted(lat, key=lambda d: (d["entry"], d["rate"]))})
    write_json(out / "goodput_vs_rate.json", {"goodput": sorted(good, key=lambda d: (d["entry"], d["rate"]))})

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for r in ran:
        for col, kind in enumerate(("rate", "concurrency")):
            lvs = sorted((lv for lv in r["levels"] if lv.get(kind) is not None), key=lambda lv: lv[kind])
            for row, (metric, limit) in enumerate((("ttft_s", slo["ttft_s"]), ("tpot_s", slo["tpot_s"]))):
                xs = [lv[kind] for lv in lvs if (lv.get(metric) or {}).get("p50") is not None]
                if xs:
                    line, = axes[row][col].plot(xs, [lv[metric]["p50"] for lv in lvs if (lv.get(metric) or {}).get("p50") is not None], "o-", label=r["entry"])
                    axes[row][col].plot(xs, [lv[metric]["p90"] for lv in lvs if (lv.get(metric) or {}).get("p50") is not None], "--", color=line.get_color(), alpha=0.6)
                axes[row][col].axhline(limit, color="red", lw=1, ls=":")
    for col, label in enumerate(("offered rate (requests/s, Poisson)", "requests in flight (closed loop)")):
        axes[1][col].set_xlabel(label)
    axes[0][0].set_ylabel("TTFT (s): P50 solid, P90 dashed")
    axes[1][0].set_ylabel("TPOT (s): P50 solid, P90 dashed")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    if ran:
        axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.suptitle("Latency vs load per serving entry (red: SLO limit)")
    fig.tight_layout()
    fig.savefig(out / CHARTS[0], bbox_inches="tight", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in ran:
        pts = sorted((d["rate"], d["goodput_share"], d["goodput"]) for d in good if d["entry"] == r["entry"])
        if pts:
            xs, shares, gps = zip(*pts)
            line, = a1.plot(xs, shares, "o-", label=r["entry"])
            a2.plot(xs, gps, "o-", color=line.get_color(), label=r["entry"])
            sr = (r.get("sustainable_rate") or {}).get("rate")
            if sr is not None:
                a1.axvline(sr, color=line.get_color(), ls=":", lw=1)
    top = max((d["rate"] for d in good), default=1)
    a1.axhline(slo["share"], color="red", lw=1, ls=":")
    a2.plot([0, top], [0, top], color="grey", ls=":", lw=1, label="every request good")
    a1.set(xlabel="offered rate (requests/s)", ylabel="share of requests meeting the SLO", ylim=(-0.02, 1.05),
           title="Goodput share (dotted: sustainable rate)")
    a2.set(xlabel="offered rate (requests/s)", ylabel="goodput (good requests/s)", title="Goodput")
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
    if ran:
        a2.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(out / CHARTS[1], bbox_inches="tight", dpi=110)
    plt.close(fig)


