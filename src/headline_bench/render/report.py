"""The benchmark report: metrics/report.md, summary.json, focus.json and the charts, from metrics on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headline_bench.analysis.recommend import ELIGIBLE_DEF, excluded, pareto_front, recommend
from headline_bench.analysis.rows import Row, headline, usd_per_million
from headline_bench.analysis.stats import bootstrap_means, clean, finite, interval, paired_ratio
from headline_bench.analysis.verdicts import apply_verdicts
from headline_bench.files import GENERATIONS, METRICS, TECHNIQUE_METRICS, read_json, read_jsonl, write_json
from headline_bench.logs import log
from headline_bench.render.markdown import f, table

REPORT, SUMMARY, FOCUS, PLOTS = METRICS / "report.md", METRICS / "summary.json", METRICS / "focus.json", METRICS / "plots"


FOCUS_KEYS = ("latency_s_p50", "latency_s_mean", "latency_s_p99", "latency_s_max", "s_per_token", "ttft_s_p50", "tokens_per_s", "samples_per_s", "peak_memory_mb",
              "weight_mb", "rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_delta", "fidelity")


SEED_COLS = ["Technique", "Avg Latency (s)", "P99 Latency (s)", "Throughput (samples/s)", "Max Memory (MB)", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]


MORE_COLS = ["Technique", "P50 (s)", "P90 (s)", "TTFT p50 (s)", "TPOT p50 (s)", "ms/token", "Tokens/s", "USD / M headlines", "Weights (MB)",
             "Memory vs baseline", "ROUGE-L {:.0%} CI", "ΔROUGE-L vs baseline [{:.0%} CI], state", "Fidelity", "Extras"]


SPEED_REFERENCE = "kv_cache"  # latency comparisons are paired per row against it


def delta(r: Row) -> str:
    if r["technique"] == "baseline":
        return "(baseline)"
    if not finite(r.get("rougeL_delta")):
        return "—"
    if r.get("baseline_identical") == 1:
        return "0 (identical headlines): non-inferior"
    return f"{r['rougeL_delta']:+.4f} [{r['rougeL_delta_low']:+.4f}, {r['rougeL_delta_high']:+.4f}] {r.get('quality_state', '—')}"


def tail(r: Row) -> str:
    """P99 where there are at least 100 samples; below that the maximum, named as such (a P99 of 12 samples is not one)."""
    n = r.get("latency_count")
    if finite(n) and n < 100:
        return f"max {f(r.get('latency_s_max'))} (n={n})"
    return f"{f(r.get('latency_s_p99'))} (n={n})" if finite(n) else f(r.get("latency_s_p99"))


def fidelity(r: Row) -> str:
    ref = r.get("fidelity_reference")
    return f"{r['identical']}/{r['compared']} vs {ref}" if ref and ref != r["technique"] and r.get("compared") else "—"


def extras(r: Row) -> str:
    parts = [f"acceptance {r['acceptance_rate']:.0%}" if finite(r.get("acceptance_rate")) else "",
             f"compile {r['compile_s']:.1f} s" if finite(r.get("compile_s")) else "",
             f"2:4 kernels {r['sparse_kernels']}" if str(r.get("sparse_kernels", "")).startswith(("skipped", "applied")) else "",
             f"{r['recompiles_in_timed_run']} recompiles in the timed run" if r.get("recompiles_in_timed_run") else "",
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
                        f"ΔROUGE-L: see Quality verdicts. Fidelity: headlines identical to the reference technique's, k/n."])


def verdicts(rows: list[Row], family: list[str], confidence: float, n_samples: int, seed: int) -> str:
    """One line per technique: its state and the numbers behind it."""
    body = []
    for r in rows:
        if r.get("skipped") or r["technique"] == "baseline" or not r.get("quality_state"):
            continue
        tested = r["technique"] in family
        diff = f"{r['rougeL_delta']:+.4f} [{r['rougeL_delta_low']:+.4f}, {r['rougeL_delta_high']:+.4f}]" if finite(r.get("rougeL_delta_low")) else "—"
        body.append([r["technique"], r.get("rougeL_delta_rows", "—"), diff,
                     f(r.get("noninferiority_margin"), ".4f"), f(r.get("rougeL_delta_p_holm"), ".4f") if tested else "—",
                     f(r.get("rougeL_delta_p_noninferior_holm"), ".4f") if tested else "—",
                     f"**{r['quality_state']}**" + (f" ({r['quality_note']})" if r.get("quality_note") else ""),
                     r.get("rows_to_decide") or "—", r.get("quality_basis", "")])
    base = next((r for r in rows if r["technique"] == "baseline"), {})
    margin = base.get("margin_share")
    header = ["Technique", "Rows", f"ΔROUGE-L [{confidence:.0%} CI]", "Margin", "p (Holm) vs 0", "p (Holm) non-inferiority", "State", "Rows to decide",
              "Basis"]
    return "\n\n".join([
        f"Each comparison runs over the rows of data/prepared both techniques have records for ({base.get('rows', '?')} here); a row a technique "
        "set aside (prompt too long, no prediction) or lacks scores 0 for it. States: **non-inferior** when the lower end of the paired "
        f"{confidence:.0%} interval of ΔROUGE-L is above -margin (margin = {margin if margin is not None else '?'} x baseline ROUGE-L "
        f"{f(base.get('rougeL'), '.4f')}, the MLPerf \"99% of the reference\" rule); **worse** when the interval lies below 0; else "
        "**inconclusive at this n**, with the rows that would decide it at the observed per-row sd (normal approximation). Intervals are "
        f"paired percentile bootstraps ({n_samples} resamples, score.seed {seed}); the states use bootstrap "
        f"p-values with Holm's correction over the {len(family)} comparison(s) tested.",
        table(header, body) if body else "No technique besides baseline has a paired difference."])


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
        body.append([r["technique"], r["fidelity_reference"], t["compared"], t["identical"], t["near_tie"], t["real_difference"],
                     t.get("unclassified", 0), f"{r['identical']}/{r['compared']}"])
        real = [d for d in t.get("differing", []) if d["class"] == "real_difference"]
        if real:
            d = real[0]
            margin = f"margin {d['margin']:.3g}" if finite(d.get("margin")) else "no margin recorded"
            notes.append(f"- **{r['technique']}**: {len(real)} real difference(s); first on `{d['id']}` at token {d['step']} ({margin})")
    header = ["Technique", "Reference", "Rows", "Identical tokens", "Near-tie", "Real difference", "Unclassified", "Identical headlines"]
    return "\n\n".join([table(header, body), "Rule: " + "; ".join(sorted(rules)) + ". Unclassified: rows without token ids on one side "
                        "(compared as strings), or a differing row whose reference recorded no logit margin (an engine without logits).", *(["\n".join(notes)] if notes else [])])


def per_row(generations: dict[str, list[Row]], name: str) -> dict[str, tuple[float, float]]:
    """{row id: (latency_s, new_tokens)} of the rows a technique generated."""
    return {g["id"]: (g["latency_s"], g["new_tokens"]) for g in generations.get(name, []) if g.get("prediction") is not None and finite(g.get("latency_s"))}


def speed_comparisons(rows: list[Row], generations: dict[str, list[Row]], n_samples: int, confidence: float, seed: int) -> None:
    """Add to each row its mean-latency interval and its paired ratios to kv_cache over the rows both generated:
    mean latency (latency_ratio_vs_kv_cache) and time per generated token (s_per_token_ratio_vs_kv_cache)."""
    ref = per_row(generations, SPEED_REFERENCE)
    for r in rows:
        mine = per_row(generations, r["technique"])
        if r.get("skipped") or not mine:
            continue
        lat = [v[0] for v in mine.values()]
        r["latency_s_mean_low"], r["latency_s_mean_high"] = interval(bootstrap_means(lat, n_samples, seed)[:, 0], confidence)
        common = [i for i in mine if i in ref]
        if not common or r["technique"] == SPEED_REFERENCE:
            continue
        a, b = [mine[i][0] for i in common], [ref[i][0] for i in common]
        r["latency_ratio_vs_kv_cache"], r["latency_ratio_vs_kv_cache_low"], r["latency_ratio_vs_kv_cache_high"] = paired_ratio(a, b, n_samples, confidence, seed)
        r["s_per_token_ratio_vs_kv_cache"], r["s_per_token_ratio_vs_kv_cache_low"], r["s_per_token_ratio_vs_kv_cache_high"] = paired_ratio(
            a, b, n_samples, confidence, seed, [mine[i][1] for i in common], [ref[i][1] for i in common])
        r["speed_rows"] = len(common)


def tie_test(generations: dict[str, list[Row]], n_samples: int, confidence: float, seed: int) -> Any:
    """tied(a, b): their time per token differs by less than noise: the paired interval of the ratio contains 1,
    or the ratio is within either technique's run-to-run spread of tokens/s."""
    def tied(a: Row, b: Row) -> bool:
        x, y = per_row(generations, b["technique"]), per_row(generations, a["technique"])
        common = [i for i in x if i in y]
        spread = max((v for v in (a.get("tokens_per_s_spread"), b.get("tokens_per_s_spread")) if finite(v)), default=0.0)
        if common:
            ratio, lo, hi = paired_ratio([x[i][0] for i in common], [y[i][0] for i in common], n_samples, confidence, seed,
                                         [x[i][1] for i in common], [y[i][1] for i in common])
        else:
            ratio = lo = hi = b["s_per_token"] / a["s_per_token"]
        return bool(lo <= 1 <= hi or abs(ratio - 1) <= spread)
    return tied


def ratio_text(r: Row, key: str) -> str:
    if finite(r.get(key)):
        return f"{r[key]:.2f}× [{r[key + '_low']:.2f}, {r[key + '_high']:.2f}]"
    return "(reference)" if r["technique"] == SPEED_REFERENCE else "—"


def latency_table(rows: list[Row], confidence: float) -> str:
    body = []
    for r in rows:
        if r.get("skipped"):
            continue
        mean = f"{f(r.get('latency_s_mean'))} [{f(r.get('latency_s_mean_low'))}, {f(r.get('latency_s_mean_high'))}]"
        passes = f"{r.get('process_count') or 1} x {r.get('repeats') or 1}"
        spread = f"{r['tokens_per_s_spread']:.1%}" if finite(r.get("tokens_per_s_spread")) else "n/a (1 run)"
        body.append([r["technique"], r.get("latency_count", "—"), passes, mean, f(r.get("latency_s_p50")), tail(r), spread,
                     ratio_text(r, "latency_ratio_vs_kv_cache"), ratio_text(r, "s_per_token_ratio_vs_kv_cache")])
    header = ["Technique", "n samples", "Processes x passes", f"Mean latency (s) [{confidence:.0%} CI]", "P50 (s)", "P99 / max (s)", "Run-to-run spread of tokens/s",
              f"Latency vs {SPEED_REFERENCE} [{confidence:.0%} CI]", f"ms/token vs {SPEED_REFERENCE} [{confidence:.0%} CI]"]
    return "\n\n".join([table(header, body),
                        f"Ratios are paired per row against {SPEED_REFERENCE} over the rows both generated (ratio of means, bootstrap interval over rows); "
                        "the ms/token ratio divides each side's latency by its own generated tokens, so shorter headlines gain nothing. Spread: "
                        "(max - min) / mean of the tokens/s of the technique's generate.processes fresh timed processes (of its generate.repeats "
                        "passes when it ran in one process). Techniques "
                        "whose ms/token ratio interval contains 1, or whose difference is within that spread, are reported as tied."])


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
    return "\n".join([f"Eligible: ran here, and {ELIGIBLE_DEF.format(confidence)}. Skipped techniques are never chosen.", "", *picks, "",
                      not_eligible])


def environment(perfs: dict[str, dict[str, Any]], prepare: dict[str, Any], rows: list[Row]) -> str:
    ran = [p for p in perfs.values() if not p.get("skipped") and p.get("env")]
    env = ran[0]["env"] if ran else next((p["env"] for p in perfs.values() if p.get("env")), {})
    models = {p["model"]["name"]: p["model"] for p in ran if p.get("model")}
    cpu = f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores)"
    device = env.get("device", "?") if str(env.get("device", "")).startswith("cpu") else f"{env.get('device', '?')}, {env.get('gpu_count', '?')} GPU(s); CPU {cpu}"
    lines = [f"- Device: {device}; torch threads {env.get('torch_threads', '?')}",
             f"- Python {env.get('python', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"]
    for m in models.values():
        pin = (f"GGUF {m['gguf']} sha256 {m['sha256']}" if m.get("gguf") else f"seed {m.get('seed')}, initialised on {m.get('init_device')}"
               if m.get("random") else f"revision {m.get('revision', '?')}")
        lines.append(f"- Model {m['name']}: {m.get('id')}, {pin}, {m.get('params', 0) / 1e6:.1f}M params, {m.get('dtype')}")
    samples = sorted({r["samples"] for r in rows if finite(r.get("samples"))})
    lines.append(f"- Data: {prepare.get('source', '?')}, {prepare.get('rows_sampled', '?')} rows sampled of {prepare.get('rows_valid', '?')} valid; "
                 f"samples per technique: {', '.join(map(str, samples)) or 'n/a'}")
    return "\n".join(lines)


def report(names: list[str], perfs: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]], prepare: dict[str, Any],
           generations: dict[str, list[Row]], focus: str, sample_headlines_n: int, balanced_rougeL_within: float,
           usd_per_hour: float | None = None) -> dict[str, Any]:
    """Build every report output from metrics already on disk and write them.

    Args:
        names: technique names in params.yaml order.
        perfs / scores: perf.json / score.json contents by technique.
        prepare: metrics/prepare.json.
        generations: generation records by technique (latency CDF, paired latency ratios, sample headlines).
        focus: params `technique`, the one focus.json and "What changed" describe.
        sample_headlines_n: example rows to show.
        balanced_rougeL_within: ROUGE-L tolerance of the balanced recommendation.
        usd_per_hour: the machine's price (report.usd_per_hour); None shows cost as n/a.

    The interval level, bootstrap resamples and seed are score's (read from score.json), so the latency
    intervals here use the same settings as the quality ones.
    """
    rows = [headline(n, perfs.get(n, {}), scores.get(n, {})) for n in names]
    by = {r["technique"]: r for r in rows}
    scored = next((s for s in scores.values() if finite(s.get("confidence"))), {})
    confidence, n_samples, seed = scored.get("confidence", 0.95), scored.get("bootstrap_samples", 10_000), scored.get("seed", 0)
    base_mem = by.get("baseline", {}).get("peak_memory_mb")
    for r in rows:
        if finite(r.get("peak_memory_mb")) and finite(base_mem) and base_mem:
            r["peak_memory_ratio"] = r["peak_memory_mb"] / base_mem
        usd = usd_per_million(r.get("samples_per_s"), usd_per_hour)
        if usd is not None:
            r["usd_per_million_headlines"] = usd
    family = apply_verdicts(rows, confidence)
    speed_comparisons(rows, generations, n_samples, confidence, seed)
    env = next((p["env"] for p in perfs.values() if p.get("env") and not p.get("skipped")), {})
    front = pareto_front(rows, "latency_s_p50", "rougeL")
    recs = recommend(rows, balanced_rougeL_within, int(env.get("gpu_count") or 0), tie_test(generations, n_samples, confidence, seed))
    from headline_bench.render.charts import write_charts

    write_charts(rows, generations, front, PLOTS)
    sections = [f"# Headline generation: inference techniques benchmark (focus: {focus})", environment(perfs, prepare, rows)]
    if focus != "baseline":
        sections += [f"## What changed: {focus} vs baseline", what_changed(by, focus)]
    sections += ["## Results", results_tables(rows, confidence, usd_per_hour), f"Pareto front (P50 latency vs ROUGE-L): {', '.join(front) or 'none'}.",
                 "## Quality verdicts", random_note(rows) or verdicts(rows, family, confidence, n_samples, seed), "## Latency", latency_table(rows, confidence),
                 "## Share of the hardware ceiling and energy", hardware(rows),
                 "## Lossless check", lossless(rows), "## Sample headlines", sample_headlines(generations, focus, sample_headlines_n),
                 "## Recommendations", random_note(rows) or recommendations(recs, rows, confidence), "## Charts", "![Latency vs ROUGE-L](plots/pareto.png)",
                 "![Peak memory](plots/memory.png)", "![Latency CDF](plots/latency_cdf.png)"]
    sections += ["## Online serving", "Serving under load is its own pipeline branch (`serve` and `serve_report` stages), so that "
                 "rebuilding this report never starts a server: see [serving_report/report.md](serving_report/report.md)."]
    REPORT.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    drop = ("technique", "first_difference", "token_check")
    techniques = {r["technique"]: {k: v for k, v in r.items() if k not in drop}
                  | ({"token_check": {k: v for k, v in r["token_check"].items() if k != "differing"}} if r.get("token_check") else {}) for r in rows}
    summary = {"focus": focus, "env": env, "prepare": prepare, "confidence": confidence, "quality_comparisons": family, "pareto_front": front,
               "recommendations": recs, "excluded": excluded(rows), "techniques": techniques}
    write_json(SUMMARY, clean(summary))
    t = by[focus]
    write_json(FOCUS, clean({"technique": focus, "skipped": t["skipped"]} if t.get("skipped") else {"technique": focus} | {k: t.get(k) for k in FOCUS_KEYS}))
    log.info("report: recommendations: %s", ", ".join(f"{r['scenario']}={r['choice']}" for r in recs))
    log.info("report: %d techniques -> %s, %s, %s, %s/", len(rows), REPORT, SUMMARY, FOCUS, PLOTS)
    return summary


def load(path: Path, name: str) -> dict[str, Any]:
    return read_json(path) if path.exists() else {"technique": name, "skipped": f"{path} missing (stage not run)"}


def report_from_disk(params: dict[str, Any]) -> dict[str, Any]:
    """report() over what the generate and score stages wrote for every technique of params.yaml."""
    names, focus, p = list(params["techniques"]), params["technique"], params["report"]
    perfs = {n: load(TECHNIQUE_METRICS / n / "perf.json", n) for n in names}
    scores = {n: load(TECHNIQUE_METRICS / n / "score.json", n) for n in names}
    gens = {n: read_jsonl(GENERATIONS / f"{n}.jsonl") for n in names if (GENERATIONS / f"{n}.jsonl").exists()}
    return report(names, perfs, scores, read_json(METRICS / "prepare.json"), gens, focus, p["sample_headlines"], p["balanced_rougeL_within"],
                  p.get("usd_per_hour"))
