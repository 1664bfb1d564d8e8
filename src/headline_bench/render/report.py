"""The benchmark report: metrics/report.md, summary.json, focus.json and the charts, from metrics on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headline_bench.analysis.latency import MIN_PROCESSES, distinct_prompts, process_rows, speed_ratio
from headline_bench.analysis.recommend import ELIGIBLE_DEF, excluded, pareto_front, recommend
from headline_bench.analysis.rows import Row, headline, usd_per_million
from headline_bench.analysis.stats import INTERVAL_METHOD, bootstrap_means, clean, finite, interval
from headline_bench.analysis.verdicts import resolve_equivalents
from headline_bench.files import GENERATIONS, METRICS, TECHNIQUE_METRICS, read_json, read_jsonl, write_json
from headline_bench.logs import log
from headline_bench.measure.environment import comparable, describe, fingerprint
from headline_bench.quality.fidelity_scope import not_measured_record
from headline_bench.render.fidelity import fidelity_section
from headline_bench.render.markdown import f, table
from headline_bench.settings import Params
from headline_bench.settings import Report as ReportSettings
from headline_bench.settings import Score as ScoreSettings

REPORT, SUMMARY, FOCUS, PLOTS = METRICS / "report.md", METRICS / "summary.json", METRICS / "focus.json", METRICS / "plots"


FOCUS_KEYS = ("latency_s_p50", "latency_s_mean", "latency_s_p99", "latency_s_max", "s_per_token", "ttft_s_p50", "tokens_per_s", "samples_per_s", "peak_memory_mb",
              "weight_mb", "rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_delta", "fidelity")


SEED_COLS = ["Technique", "Avg Latency (s)", "P99 Latency (s)", "Throughput (samples/s)", "Max Memory (MB)", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]


MORE_COLS = ["Technique", "P50 (s)", "P90 (s)", "TTFT p50 (s)", "TPOT p50 (s)", "ms/token", "Tokens/s", "USD / M headlines", "Weights (MB)",
             "Memory vs baseline", "ROUGE-L {:.0%} CI", "ΔROUGE-L vs baseline [simultaneous interval], state", "Fidelity", "Extras"]


SPEED_REFERENCE = "kv_cache"  # latency comparisons are paired per row against it


def delta(r: Row) -> str:
    """ΔROUGE-L with the interval its state was decided from, and the state (one rule: analysis/verdicts.py)."""
    if r.get("quality_state") == "reference":
        return "(reference)"
    if r.get("quality_state") == "equivalent":
        return f"{f(r.get('rougeL_delta'), '+.4f')}: {r['quality_basis']}"
    if not finite(r.get("rougeL_delta")):
        return "—"
    ci = f" [{r['rougeL_delta_low']:+.4f}, {r['rougeL_delta_high']:+.4f}]" if finite(r.get("rougeL_delta_low")) else ""
    vs = f" vs {r['rougeL_delta_vs']}" if r.get("rougeL_delta_vs") not in (None, "baseline") else ""
    return f"{r['rougeL_delta']:+.4f}{ci}{vs} {r.get('quality_state', '—')}"


def tail(r: Row) -> str:
    """P99 where there are at least 100 samples; below that the maximum, named as such (a P99 of 12 samples is not one).
    n counts samples (rows x passes); the distinct prompts behind them are named too."""
    n, k = r.get("latency_count"), r.get("latency_prompts")
    of = f"n={n}" + (f" of {k} prompts" if finite(k) else "")
    if finite(n) and n < 100:
        return f"max {f(r.get('latency_s_max'))} ({of})"
    return f"{f(r.get('latency_s_p99'))} ({of})" if finite(n) else f(r.get("latency_s_p99"))


def fidelity(r: Row) -> str:
    ref = r.get("fidelity_reference")
    return f"{r['identical']}/{r['compared']} vs {ref}" if ref and ref != r["technique"] and r.get("compared") else "—"


def extras(r: Row) -> str:
    parts = [f"acceptance {r['acceptance_rate']:.0%}" if finite(r.get("acceptance_rate")) else "",
             f"compile {r['compile_s']:.1f} s" if finite(r.get("compile_s")) else "",
             f"2:4 kernels {r['sparse_kernels']}" if str(r.get("sparse_kernels", "")).startswith(("skipped", "applied")) else "",
             f"{r['recompiles_in_timed_run']} recompiles in the timed run" if r.get("recompiles_in_timed_run") else "",
             f"{r['cudagraph_skips_in_timed_run']} CUDA graph skips in the timed run" if r.get("cudagraph_skips_in_timed_run") else "",
             f"compile mode {r['compile_mode']}" if r.get("compile_mode") else "",
             "draft " + ", ".join(f"{k}={v}" for k, v in r["speculative_used"].items()) if r.get("speculative_used") else "",
             f"sparsity {r['sparsity_overall']:.0%} of {r.get('sparsity_layers') or 'pruned layers'}, {r['sparsity_all_params']:.0%} of all parameters"
             if finite(r.get("sparsity_overall")) and finite(r.get("sparsity_all_params")) else "",
             f"draft {r['draft_weight_mb']:.0f} MB" if finite(r.get("draft_weight_mb")) else "", r.get("weight_format") or "",
             f"{r['tp_size']} ranks: weights and memory summed" if r.get("tp_size") else ""]
    return "; ".join(p for p in parts if p) or "—"


def results_tables(rows: list[Row], confidence: float, usd_per_hour: float | None) -> str:
    seed, more = [], []
    for r in rows:
        if r.get("skipped"):
            seed.append([r["technique"], f"skipped: {r['skipped']}"] + ["—"] * 7)
            more.append([r["technique"], "skipped"] + ["—"] * (len(MORE_COLS) - 2))
            continue
        rouge = [r["quality"]] * 4 if r.get("quality") else [f(r.get(k), ".4f") for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
        memory = f(r.get("peak_memory_mb"), ".1f") if finite(r.get("peak_memory_mb")) else f"n/a ({r['memory_note']})" if r.get("memory_note") else "—"
        seed.append([r["technique"], f(r.get("latency_s_mean")), tail(r), f(r.get("samples_per_s")), memory, *rouge])
        ci = f"[{r['rougeL_low']:.4f}, {r['rougeL_high']:.4f}]" if finite(r.get("rougeL_low")) else "—"
        usd = usd_per_million(r.get("samples_per_s"), usd_per_hour)
        more.append([r["technique"], f(r.get("latency_s_p50")), f(r.get("latency_s_p90")), f(r.get("ttft_s_p50"), ".4f"), f(r.get("tpot_s_p50"), ".4f"),
                     f(1000 * r["s_per_token"] if finite(r.get("s_per_token")) else None, ".1f"), f(r.get("tokens_per_s"), ".1f"),
                     f(usd, ",.2f") if usd is not None else "n/a", f(r.get("weight_mb"), ".1f"), f(r.get("peak_memory_ratio"), ".2f") + "×", ci, delta(r),
                     fidelity(r), extras(r)])
    measures = sorted({r["memory_measure"] for r in rows if r.get("memory_measure")})
    price = (f"USD / M headlines: report.usd_per_hour = {usd_per_hour} USD/h divided by the measured samples/s" if usd_per_hour is not None
             else "USD / M headlines: n/a (set report.usd_per_hour, the machine's price per hour)")
    return "\n\n".join([table(SEED_COLS, seed),
                        f"Max Memory is {' / '.join(measures) or 'n/a'} during the timed run (each technique runs in its own process). "
                        "ROUGE values are means of per-row F-measures over every row (a row set aside scores 0). Latency percentiles: "
                        "numpy linear interpolation over n per-row samples (rows x timed passes); below 100 samples the P99 column shows the maximum.",
                        table([c.format(confidence) for c in MORE_COLS], more),
                        f"ms/token: mean per-row latency / mean new tokens (prefill included), the length-fair speed measure. {price}. "
                        f"ΔROUGE-L: with the interval at its family's simultaneous level that decided the state (Quality verdicts). Fidelity: headlines identical to the reference technique's, k/n."])


def machine(env: dict[str, Any] | None) -> str | None:
    """The machine a technique's outputs were generated on, from its perf.json env: the GPU, or the CPU model with its
    family/model and kernel ISA flags (environment.cpu_identity), since greedy outputs follow the CPU's numerics."""
    if not env:
        return None
    if env.get("gpu_count"):
        return f"{env.get('device')} x {env['gpu_count']}"
    ident = "; ".join(str(env[k]) for k in ("cpu_id", "cpu_isa") if env.get(k))
    return f"{env.get('cpu', '?')}" + (f" ({ident})" if ident else "")


def decided_on(r: Row, by: dict[str, Row]) -> str:
    """The technique's machine, and its reference's where that differs (the state then compares across machines)."""
    mine, ref = r.get("machine"), by.get(r.get("quality_reference") or r.get("rougeL_delta_vs") or "baseline", {}).get("machine")
    if not mine:
        return "—"
    return mine if not ref or ref == mine else f"{mine}; **reference on {ref}**"


def verdicts(rows: list[Row], confidence: float, score_params: ScoreSettings) -> str:
    """One line per technique: the state and the interval it was decided from, side by side, and the machine it holds for."""
    body = []
    by = {r["technique"]: r for r in rows}
    for r in rows:
        state = r.get("quality_state")
        if r.get("skipped") or not state or state == "reference":
            continue
        if state == "equivalent":
            ref_state = r.get("quality_effective")
            body.append([r["technique"], "— (lossless)", r.get("rows", "—"), f(r.get("rougeL_delta"), "+.4f"), "—", "—", yes_no(r.get("mlperf_99")),
                         f"**equivalent** (takes {r['quality_reference']}'s: {ref_state})", need(r), decided_on(r, by), r.get("quality_basis", "")])
            continue
        ci = f"[{r['rougeL_delta_low']:+.4f}, {r['rougeL_delta_high']:+.4f}]" if finite(r.get("rougeL_delta_low")) else "—"
        note = f" ({r['quality_note']})" if r.get("quality_note") else ""
        body.append([r["technique"], f"{r.get('family')} (k={r.get('comparisons')})", r.get("rougeL_delta_rows", "—"),
                     f"{f(r.get('rougeL_delta'), '+.4f')} vs {r.get('rougeL_delta_vs', 'baseline')}", ci,
                     f"{r['interval_level']:.4f}" if finite(r.get("interval_level")) else "—", yes_no(r.get("mlperf_99")), f"**{state}**{note}",
                     need(r), decided_on(r, by), r.get("quality_basis", "")])
    s = score_params
    family, models = s.family, s.model_comparisons
    ran = {r["technique"] for r in rows if not r.get("skipped")}
    absent = [n for n in family if n not in ran]
    header = ["Technique", "Family", "Rows", "ΔROUGE-L", "Simultaneous interval", "Level", "MLPerf 99% (point)", "State", "Rows to decide",
              "Machine", "Basis"]
    return "\n\n".join([
        f"One rule, decided from the interval printed beside it. Each comparison is an interval of the mean per-row ΔROUGE-L over the rows either "
        f"technique has a record for (a row one of them set aside scores 0; {INTERVAL_METHOD}, so that a few broken headlines cannot "
        "pull the lower end above the truth), at the **simultaneous** level of its family: 1 - "
        f"{1 - confidence:.2g} / k (Bonferroni), so a family's intervals cover together with probability >= {confidence:.0%}. Families come "
        f"from params, not from what ran: lossy (score.family, k = {len(family)}: {', '.join(family) or 'none'}"
        + (f"; not run here but counted: {', '.join(absent)}" if absent else "") + f") and model comparisons (score.model_comparisons, "
        f"k = {len(models)}: {', '.join(models) or 'none'}). States: fewer than {s.min_rows} rows: **too few rows**; lower end > "
        f"-{s.margin} (score.margin, absolute ROUGE-L): **non-inferior** (noted when also significantly below or above); upper end "
        f"< -{s.margin}: **worse** (the loss is beyond the margin); else **inconclusive**, noted \"significantly below\" when the upper end is "
        "below 0 but not below the margin (a real loss that may be within it). Rows to decide: rows for "
        f"{s.power:.0%} power if the true difference and per-row sd were the observed ones, with the state they would decide. "
        "A lossless technique whose token ids all equal its reference's or differ only at near-ties is **equivalent** (no test; it takes the "
        "reference's state); one with real differences is tested against its reference at the lossy family's level. MLPerf 99%: the point "
        "estimate reaches 99% of the reference's ROUGE-L (information only; it is not the state). Machine: where the technique's outputs "
        "were generated (perf.json env: CPU model, family/model and kernel ISA flags, or GPU); greedy outputs, and so the states, can differ "
        "between CPUs (bf16 numerics follow the ISA), so a state holds for that machine.",
        table(header, body) if body else "No technique besides baseline has a quality comparison."])


def yes_no(v: Any) -> str:
    return "—" if v is None else "yes" if v else "no"


def need(r: Row) -> str:
    return f"{r['rows_to_decide']} ({r.get('rows_to_decide_state') or 'to reach min_rows'})" if r.get("rows_to_decide") else "—"


def hardware(rows: list[Row]) -> str:
    """Share of the memory-bandwidth ceiling (MBU) and GPU energy per technique, with the formula and the peak's source."""
    ran = [r for r in rows if not r.get("skipped")]
    if not ran:
        return "No technique ran."
    lines = [[r["technique"], f(r.get("tpot_s_p50"), ".4f"), f(r.get("bytes_per_step_mb"), ".0f"), f(r.get("achieved_bandwidth_gbs"), ".1f"),
              f"{r['bandwidth_share']:.1%}" if finite(r.get("bandwidth_share")) else "n/a", f(r.get("energy_j_per_headline"), ".2f"),
              f(r.get("energy_j_per_token"), ".3f")] for r in ran]
    peaks = sorted({f"{r['peak_bandwidth_gbs']:.0f} GB/s ({r['peak_bandwidth_source']})" if finite(r.get("peak_bandwidth_gbs"))
                    else str(r.get("peak_bandwidth_source")) for r in ran if r.get("peak_bandwidth_source")})
    energy = sorted({str(r.get("energy_source")) for r in ran if r.get("energy_source")})
    from headline_bench.measure.roofline import MBU_FORMULA

    return "\n\n".join([table(["Technique", "TPOT p50 (s)", "Bytes/step (MB)", "Achieved GB/s", "Share of peak", "J/headline", "J/token"], lines),
                         f"{MBU_FORMULA}; TPOT per decode step at batch size (batched: per step of the whole batch). Assisted decoding "
                         "(several tokens per step) has no per-token time, so no share. Peak: " + ("; ".join(peaks) or "n/a") + ". Energy: "
                         + ("; ".join(energy) or "n/a") + "."])


def random_note(rows: list[Row]) -> str | None:
    """Random-weight runs measure speed and memory only: no quality verdict, so no recommendation rests on one."""
    if not any(r.get("quality") for r in rows):
        return None
    return ("n/a: the weights are random, so ROUGE would score noise; no quality verdict and no recommendation is drawn. "
            "Read speed, memory and the share of the bandwidth ceiling from the tables; lossless techniques are checked by token ids.")


def lossless(rows: list[Row]) -> str:
    """Lossless techniques against their reference, by token ids: identical / near-tie / real difference."""
    checked = [r for r in rows if r.get("reference") and r["reference"] != r["technique"] and not r.get("skipped") and r.get("token_check")]
    if not checked:
        return "No lossless technique ran here."
    body, rules, notes = [], set(), []
    for r in checked:
        t = r["token_check"]
        rules.add(t["rule"])
        outcome = "equivalent" if r.get("quality_state") == "equivalent" else f"quality comparison: {r.get('quality_state', '—')}"
        moved = t.get("perturbation") or {}
        shift = (f"{moved['worst_q0.9']:.3g} on `{moved['worst_row']}` (cap {moved['cap']:.3g}, {moved['rows_judged']} rows judged)"
                 if moved.get("worst_q0.9") is not None and moved.get("cap") is not None else "—")
        body.append([r["technique"], r["fidelity_reference"], t["compared"], t["identical"], t["near_tie"], t["real_difference"],
                     t.get("unclassified", 0), shift, f"{r['identical']}/{r['compared']}", outcome])
        real = [d for d in t.get("differing", []) if d["class"] != "near_tie"]
        if real:
            rows_text = ", ".join(differing_row(d) for d in real)
            notes.append(f"- **{r['technique']}**: {len(real)} row(s) differ beyond a near-tie: {rows_text}")
    header = ["Technique", "Reference", "Rows", "Identical tokens", "Near-tie", "Real difference", "Unclassified", "Margin perturbation q0.9, worst row",
              "Identical headlines", "Outcome"]
    return "\n\n".join([table(header, body), "Rule: " + "; ".join(sorted(rules)) + ". Unclassified: rows without token ids on one side "
                        "(compared as strings), a differing row whose reference recorded no logit margin (an engine without logits), or a near-tie whose "
                        "perturbation has too few shared positions to judge. A technique "
                        "whose rows are all identical or near-ties is equivalent to its reference and outside the quality families; any other row "
                        "makes it a quality comparison (Quality verdicts).", *(["\n".join(notes)] if notes else [])])


def differing_row(d: dict[str, Any]) -> str:
    margin = f"margin {d['margin']:.3g}" if finite(d.get("margin")) else "no margin"
    return f"`{d['id']}` (token {d['step']}, {margin}, {d['class'].replace('_', ' ')})"


def speed_comparisons(rows: list[Row], generations: dict[str, list[Row]], perfs: dict[str, dict[str, Any]], n_samples: int, confidence: float,
                      seed: int, tie: float) -> None:
    """Add to each row its mean-latency interval over rows and its ms/token ratio to kv_cache over processes and rows
    (analysis/latency.py: interval, verdict tied / faster / slower / unresolved), plus the distinct prompts behind its percentiles."""
    ref = process_rows(perfs.get(SPEED_REFERENCE, {}), generations.get(SPEED_REFERENCE, []))
    for r in rows:
        recs = generations.get(r["technique"], [])
        mine = process_rows(perfs.get(r["technique"], {}), recs)
        if r.get("skipped") or not mine or not mine[0]:
            continue
        r["latency_prompts"], r["timed_processes"] = distinct_prompts(recs), len(mine)
        lat = [g["latency_s"] for g in recs if g.get("prediction") is not None and finite(g.get("latency_s"))]
        r["latency_s_mean_low"], r["latency_s_mean_high"] = interval(bootstrap_means(lat, n_samples, seed)[:, 0], confidence)
        if r["technique"] == SPEED_REFERENCE or not ref:
            continue
        cmp = speed_ratio(mine, ref, confidence, n_samples, seed, tie)
        if cmp:
            r["speed_vs_kv_cache"] = cmp


def speed_tie(generations: dict[str, list[Row]], perfs: dict[str, dict[str, Any]], n_samples: int, confidence: float, seed: int, tie: float) -> Any:
    """verdict(a, b): the speed verdict of b against a (tied / faster / slower / unresolved, or n/a), for recommendation notes."""
    def verdict(a: Row, b: Row) -> str:
        procs = [process_rows(perfs.get(x["technique"], {}), generations.get(x["technique"], [])) for x in (b, a)]
        cmp = speed_ratio(procs[0], procs[1], confidence, n_samples, seed, tie) if all(p and p[0] for p in procs) else None
        return cmp["verdict"] if cmp else "n/a: no common rows"
    return verdict


def ratio_text(r: Row) -> str:
    c = r.get("speed_vs_kv_cache")
    if not c:
        return "(reference)" if r["technique"] == SPEED_REFERENCE else "—"
    if finite(c.get("low")):
        tost = f" ({c['tie_level']:.0%}: [{c['tie_low']:.2f}, {c['tie_high']:.2f}])" if c.get("verdict") == "tied" and finite(c.get("tie_low")) else ""
        return f"{c['ratio']:.2f}× [{c['low']:.2f}, {c['high']:.2f}]{tost} **{c['verdict']}** ({c['basis']})"
    return f"{c['ratio']:.2f}× [{c['rows_low']:.2f}, {c['rows_high']:.2f}] rows only; {c['verdict']}"


def latency_table(rows: list[Row], confidence: float, tie: float) -> str:
    body = []
    for r in rows:
        if r.get("skipped"):
            continue
        mean = f"{f(r.get('latency_s_mean'))} [{f(r.get('latency_s_mean_low'))}, {f(r.get('latency_s_mean_high'))}]"
        spread = f"{r['tokens_per_s_spread']:.1%}" if finite(r.get("tokens_per_s_spread")) else "n/a (1 pass)"
        body.append([r["technique"], f"{r.get('latency_count', '—')} ({r.get('latency_prompts', '—')} prompts)", r.get("timed_processes", "—"),
                     r.get("repeats") or 1, mean, f(r.get("latency_s_p50")), tail(r), spread, ratio_text(r)])
    header = ["Technique", "n samples (distinct prompts)", "Processes", "Passes", f"Mean latency (s) [{confidence:.0%} CI over rows]", "P50 (s)",
              "P99 / max (s)", "Run-to-run spread of tokens/s", f"ms/token vs {SPEED_REFERENCE} [{confidence:.0%} CI], verdict"]
    return "\n\n".join([table(header, body),
                        f"Percentiles pool every timed pass, so n samples repeat the same distinct prompts. The ms/token ratio against {SPEED_REFERENCE} "
                        "divides each side's latency by its own generated tokens (shorter headlines gain nothing); its interval adds the run-to-run "
                        "variance between timed processes (log ratio per process) to the row bootstrap's, with Welch-Satterthwaite degrees of "
                        f"freedom over those parts. Verdicts: **tied** only when the {1 - 2 * (1 - confidence):.0%} interval (printed beside it) lies "
                        f"within [{1 - tie:.2f}, {1 + tie:.2f}] (report.speed_tie; two one-sided tests at {1 - confidence:.0%} each); **faster** / "
                        f"**slower** when the {confidence:.0%} interval excludes 1; else **unresolved**; n/a with fewer than "
                        f"{MIN_PROCESSES} timed processes on either side (then only the rows-only interval is shown). Spread: (max - min) / mean "
                        "of the per-pass tokens/s."])


def sample_headlines(generations: dict[str, list[Row]], focus: str, n: int) -> str:
    base = [g for g in generations.get("baseline", []) if g.get("prediction") is not None]
    theirs = {g["id"]: g.get("prediction") for g in generations.get(focus, [])}
    names = ["baseline"] + ([focus] if focus != "baseline" else [])
    rows = [[g["summary"], g["reference"], g["prediction"]] + ([theirs.get(g["id"]) or "—"] if focus != "baseline" else []) for g in base[:n]]
    return table(["Summary", "Reference"] + names, rows) if rows else "No generations to show."


def what_changed(rows: dict[str, Row], focus: str) -> str:
    b, t = rows.get("baseline", {}), rows[focus]
    if t.get("skipped"):
        return f"**{focus}** was skipped on this machine: {t['skipped']}"

    def change(k: str) -> str:
        return f"{t[k] / b[k] - 1:+.0%}" if finite(t.get(k)) and finite(b.get(k)) and b[k] else "—"
    lines = [["P50 latency (s)", f(b.get("latency_s_p50")), f(t.get("latency_s_p50")), change("latency_s_p50")],
             ["Tokens/s", f(b.get("tokens_per_s"), ".1f"), f(t.get("tokens_per_s"), ".1f"), change("tokens_per_s")],
             [f"Peak memory (MB, {t.get('memory_measure')})", f(b.get("peak_memory_mb"), ".0f"), f(t.get("peak_memory_mb"), ".0f"), change("peak_memory_mb")],
             ["ROUGE-L", f(b.get("rougeL"), ".4f"), f(t.get("rougeL"), ".4f"), delta(t)], ["Fidelity", "", fidelity(t), ""]]
    return table(["Metric", "baseline", focus, "Change"], lines)


def recommendations(recs: list[Row], rows: list[Row], confidence: float) -> str:
    picks = [f"- **{r['scenario']}: {r['choice'] or 'none'}** ({r['value']}). Rule: {r['rule']}." + (f" Note: {r['note']}." if r.get("note") else "")
             for r in recs]
    out = excluded(rows)
    not_eligible = ("Not eligible: " + "; ".join(out) + ".") if out else "Every technique that ran is eligible."
    return "\n".join([f"Eligible: a technique that ran here and is {ELIGIBLE_DEF}. Skipped techniques are never chosen.", "", *picks, "",
                      not_eligible])


def environments(perfs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct environments the measured techniques ran in (environment.comparable fingerprints), each with its
    techniques and their engines, in params order. Skips and failures measured nothing, so they are left out."""
    groups: list[dict[str, Any]] = []
    for name, p in perfs.items():
        if p.get("skipped") or p.get("failed") or not p.get("env"):
            continue
        fp = fingerprint(p["env"])
        group = next((g for g in groups if g["fingerprint"] == comparable(fp)), None)
        if group is None:
            groups.append(group := {"label": chr(ord("A") + len(groups)), "fingerprint": comparable(fp), "techniques": [], "engines": {}})
        group["techniques"].append(name)
        group["engines"][name] = fp.get("engine")
    return groups


def environment_warning(groups: list[dict[str, Any]]) -> str | None:
    """A warning naming what differs when the techniques were measured in more than one environment."""
    if len(groups) < 2:
        return None
    differ = [k for k in groups[0]["fingerprint"] if len({str(g["fingerprint"].get(k)) for g in groups}) > 1]
    return (f"techniques were measured in {len(groups)} different environments (they differ in: {', '.join(differ)}): speed, memory "
            "and energy compare only within one environment, so ratios, ties and recommendations across them are not like for like")


def lock_drift(perfs: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{"name installed X, lock Y; ...": [techniques]} for the techniques measured on versions other than the lock's."""
    out: dict[str, list[str]] = {}
    for name, p in perfs.items():
        if drift := (p.get("env") or {}).get("lock_drift"):
            out.setdefault("; ".join(drift), []).append(name)
    return out


def resumed(perfs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{technique: resume facts} of the techniques whose rows came from more than one session."""
    return {n: p["resume"] for n, p in perfs.items() if (p.get("resume") or {}).get("resumed_rows") and not p.get("skipped")}


def environment(perfs: dict[str, dict[str, Any]], prepare: dict[str, Any], rows: list[Row]) -> str:
    """Where the numbers come from: one line per distinct environment naming its techniques (and a warning when
    there are several), resumed techniques, the models and the data."""
    groups = environments(perfs)
    lines = []
    for g in groups:
        engines = sorted({f"{e} ({n})" for n, e in g["engines"].items() if e and not str(e).startswith("transformers ")})
        lines.append(f"- Environment {g['label']}: {describe(g['fingerprint'])}: " + ", ".join(g["techniques"])
                     + (f"; other engines: {', '.join(engines)}" if engines else ""))
    warning = environment_warning(groups)
    if warning:
        lines.append(f"- **Warning: {warning}.**")
    for drift, names in lock_drift(perfs).items():
        lines.append(f"- **Warning: not the locked versions** ({drift}; requirements.lock, `scripts/setup`): {', '.join(names)}")
    builds = sorted({p["env"]["llama_cpp_build"] for p in perfs.values() if (p.get("env") or {}).get("llama_cpp_build")})
    for build in builds:
        lines.append(f"- llama.cpp build: {build}")
    for name, r in resumed(perfs).items():
        lines.append(f"- **Resumed: {name}** ({r.get('sessions')} sessions): {r['resumed_rows']} row(s) were generated and timed in an earlier "
                     "session with the same settings and environment fingerprint (the resume key); warm-up, wall time, peak memory and energy "
                     "are the last session's")
    ran = [p for p in perfs.values() if not p.get("skipped") and p.get("env")]
    models = {p["model"]["name"]: p["model"] for p in ran if p.get("model")}
    for m in models.values():
        pin = (f"GGUF {m['gguf']} sha256 {m['sha256']}" if m.get("gguf") else f"seed {m.get('seed')}, initialised on {m.get('init_device')}"
               if m.get("random") else f"revision {m.get('revision', '?')}")
        lines.append(f"- Model {m['name']}: {m.get('id')}, {pin}, {m.get('params', 0) / 1e6:.1f}M params, {m.get('dtype')}")
    samples = sorted({r["samples"] for r in rows if finite(r.get("samples"))})
    lines.append(f"- Data: {prepare.get('source', '?')}, {prepare.get('rows_sampled', '?')} rows sampled of {prepare.get('rows_valid', '?')} valid; "
                 f"samples per technique: {', '.join(map(str, samples)) or 'n/a'}")
    return "\n".join(lines)


def report(names: list[str], perfs: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]], prepare: dict[str, Any],
           generations: dict[str, list[Row]], focus: str, settings: ReportSettings, score_settings: ScoreSettings,
           fidelities: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build every report output from metrics already on disk and write them.

    Args:
        names: technique names in params.yaml order.
        perfs / scores: perf.json / score.json contents by technique.
        prepare: metrics/prepare.json.
        generations: generation records by technique (latency CDF, paired latency ratios, sample headlines).
        focus: params `technique`, the one focus.json and "What changed" describe.
        settings: params `report` (sample_headlines, balanced_rougeL_within, memory_tie_share, speed_tie, usd_per_hour: None shows
            cost as n/a).
        score_settings: params `score` (the declared families, margin, min_rows, power), which the verdicts section states.
        fidelities: fidelity.json contents by technique (teacher-forced fidelity; None: that stage did not run).

    The interval level, bootstrap resamples and seed are score's (read from score.json), so the latency
    intervals here use the same settings as the quality ones.
    """
    usd_per_hour = settings.usd_per_hour
    rows = [headline(n, perfs.get(n, {}), scores.get(n, {})) for n in names]
    by = {r["technique"]: r for r in rows}
    scored = next((s for s in scores.values() if finite(s.get("confidence"))), None)  # none when every technique was skipped
    confidence, n_samples, seed = (scored["confidence"], scored["bootstrap_samples"], scored["seed"]) if scored else (
        score_settings.confidence, score_settings.bootstrap_samples, score_settings.seed)
    base_mem = by.get("baseline", {}).get("peak_memory_mb")
    for r in rows:
        if finite(r.get("peak_memory_mb")) and finite(base_mem) and base_mem:
            r["peak_memory_ratio"] = r["peak_memory_mb"] / base_mem
        usd = usd_per_million(r.get("samples_per_s"), usd_per_hour)
        if usd is not None:
            r["usd_per_million_headlines"] = usd
        if not r.get("skipped") and machine(perfs.get(r["technique"], {}).get("env")):
            r["machine"] = machine(perfs[r["technique"]]["env"])
    resolve_equivalents(rows)
    tie = settings.speed_tie
    speed_comparisons(rows, generations, perfs, n_samples, confidence, seed, tie)
    env = next((p["env"] for p in perfs.values() if p.get("env") and not p.get("skipped")), {})
    front = pareto_front(rows, "latency_s_p50", "rougeL")
    for r in rows:  # eligibility counts fidelity within bound (analysis/recommend.eligible)
        fid = (fidelities or {}).get(r["technique"]) or {}
        r["fidelity_state"] = fid.get("fidelity_state")
    recs = recommend(rows, settings.balanced_rougeL_within, int(env.get("gpu_count") or 0),
                     speed_tie(generations, perfs, n_samples, confidence, seed, tie), settings.memory_tie_share)
    from headline_bench.render.charts import write_charts

    write_charts(rows, generations, front, PLOTS)
    sections = [f"# Headline generation: inference techniques benchmark (focus: {focus})", environment(perfs, prepare, rows)]
    if focus != "baseline":
        sections += [f"## What changed: {focus} vs baseline", what_changed(by, focus)]
    sections += ["## Results", results_tables(rows, confidence, usd_per_hour), f"Pareto front (P50 latency vs ROUGE-L): {', '.join(front) or 'none'}.",
                 "## Quality verdicts", random_note(rows) or verdicts(rows, confidence, score_settings),
                 "## Fidelity to baseline", fidelity_section(names, fidelities or {}, {r["technique"]: r.get("quality_state") for r in rows}),
                 "## Latency", latency_table(rows, confidence, tie),
                 "## Share of the hardware ceiling and energy", hardware(rows),
                 "## Lossless check", lossless(rows), "## Sample headlines", sample_headlines(generations, focus, settings.sample_headlines),
                 "## Recommendations", random_note(rows) or recommendations(recs, rows, confidence), "## Charts", "![Latency vs ROUGE-L](plots/pareto.png)",
                 "![Peak memory](plots/memory.png)", "![Latency CDF](plots/latency_cdf.png)"]
    sections += ["## Online serving", "Serving under load is its own pipeline branch (`serve` and `serve_report` stages), so that "
                 "rebuilding this report never starts a server: see [serving_report/report.md](serving_report/report.md)."]
    REPORT.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    groups = environments(perfs)
    for g in groups:
        for name in g["techniques"]:
            by[name]["environment"] = g["label"]
    for name, fid in (fidelities or {}).items():
        by[name]["fidelity_state"] = fid.get("fidelity_state") or fid.get("not_measured") or fid.get("skipped")
    for name, r in resumed(perfs).items():
        by[name] |= {"resumed_rows": r["resumed_rows"], "sessions": r.get("sessions")}
    drop = ("technique", "first_difference", "token_check")
    techniques = {r["technique"]: {k: v for k, v in r.items() if k not in drop}
                  | ({"token_check": {k: v for k, v in r["token_check"].items() if k != "differing"}} if r.get("token_check") else {}) for r in rows}
    families = {"lossy": score_settings.family, "model comparison": score_settings.model_comparisons}
    summary = {"focus": focus, "env": env, "environments": groups, "environment_warning": environment_warning(groups), "lock_drift": lock_drift(perfs), "prepare": prepare,
               "confidence": confidence, "quality_families": families, "pareto_front": front, "recommendations": recs, "excluded": excluded(rows),
               "techniques": techniques}
    write_json(SUMMARY, clean(summary))
    t = by[focus]
    write_json(FOCUS, clean({"technique": focus, "skipped": t["skipped"]} if t.get("skipped") else {"technique": focus} | {k: t.get(k) for k in FOCUS_KEYS}))
    log.info("report: recommendations: %s", ", ".join(f"{r['scenario']}={r['choice']}" for r in recs))
    log.info("report: %d techniques -> %s, %s, %s, %s/", len(rows), REPORT, SUMMARY, FOCUS, PLOTS)
    return summary


def load(path: Path, name: str) -> dict[str, Any]:
    return read_json(path) if path.exists() else {"technique": name, "skipped": f"{path} missing (stage not run)"}


def fidelity_record(name: str, params: Params) -> dict[str, Any]:
    """The fidelity stage's fidelity.json (it runs for score.family only), else the n/a params give the technique."""
    if name in (params.score or ScoreSettings()).family:
        return load(TECHNIQUE_METRICS / name / "fidelity.json", name)
    return not_measured_record(name, params) or {"technique": name, "not_measured": "n/a: not in score.family (no fidelity stage)"}


def report_from_disk(params: Params) -> dict[str, Any]:
    """report() over what the generate and score stages wrote for every technique of params.yaml."""
    names, focus = list(params.techniques), str(params.technique)
    perfs = {n: load(TECHNIQUE_METRICS / n / "perf.json", n) for n in names}
    scores = {n: load(TECHNIQUE_METRICS / n / "score.json", n) for n in names}
    gens = {n: read_jsonl(GENERATIONS / f"{n}.jsonl") for n in names if (GENERATIONS / f"{n}.jsonl").exists()}
    fids = {n: fidelity_record(n, params) for n in names}
    return report(names, perfs, scores, read_json(METRICS / "prepare.json"), gens, focus, params.report or ReportSettings(), params.score or ScoreSettings(),
                  fids)
