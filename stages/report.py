"""Report: read metrics/techniques/*/{perf,score}.json, metrics/prepare.json and a few rows of
data/generations/*.jsonl; write metrics/report.md, metrics/summary.json, metrics/focus.json (the DVC metric:
the focused technique's numbers under technique-agnostic keys) and metrics/plots/ (PNGs + dvc plots data).
Nothing is measured or recomputed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import GENERATIONS, METRICS, TECHNIQUE_METRICS, fail, load_params, log, read_json, read_jsonl, setup_logging, write_json
from stats import NOT_WORSE_DEF, Row, clean, finite, headline, pareto_front, recommend, verdict

REPORT, SUMMARY, FOCUS, PLOTS = METRICS / "report.md", METRICS / "summary.json", METRICS / "focus.json", METRICS / "plots"
FOCUS_KEYS = ("latency_s_p50", "latency_s_mean", "latency_s_p99", "ttft_s_p50", "tokens_per_s", "samples_per_s", "peak_memory_mb",
              "weight_mb", "rouge1", "rouge2", "rougeL", "rougeLsum", "rougeL_delta", "fidelity")
SEED_COLS = ["Technique", "Avg Latency (s)", "P99 Latency (s)", "Throughput (samples/s)", "Max Memory (MB)", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]
MORE_COLS = ["Technique", "P50 (s)", "P90 (s)", "TTFT p50 (s)", "TPOT p50 (s)", "Tokens/s", "Weights (MB)", "Memory vs baseline",
             "ROUGE-L 95% CI", "ΔROUGE-L vs baseline [{:.0%} CI]", "Fidelity", "Extras"]
VERDICT = {"same": "no significant difference", "worse": "significantly worse", "better": "significantly better"}


def f(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if finite(v) else "—"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def delta(r: Row) -> str:
    if r["technique"] == "baseline":
        return "(baseline)"
    if verdict(r) is None:
        return "—"
    if r.get("baseline_identical") == 1:
        return "0 (identical headlines)"
    return f"{r['rougeL_delta']:+.4f} [{r['rougeL_delta_low']:+.4f}, {r['rougeL_delta_high']:+.4f}] {VERDICT[verdict(r)]}"


def fidelity(r: Row) -> str:
    ref = r.get("fidelity_reference")
    return f"{r['identical']}/{r['compared']} vs {ref}" if ref and ref != r["technique"] and r.get("compared") else "—"


def extras(r: Row) -> str:
    parts = [f"acceptance {r['acceptance_rate']:.0%}" if finite(r.get("acceptance_rate")) else "",
             f"compile {r['compile_s']:.1f} s" if finite(r.get("compile_s")) else "",
             f"sparsity {r['sparsity_overall']:.0%}" if finite(r.get("sparsity_overall")) else "",
             f"draft {r['draft_weight_mb']:.0f} MB" if finite(r.get("draft_weight_mb")) else "", r.get("weight_format") or "",
             f"{r['tp_size']} ranks: weights and memory summed" if r.get("tp_size") else ""]
    return "; ".join(p for p in parts if p) or "—"


def results_tables(rows: list[Row], confidence: float) -> str:
    seed, more = [], []
    for r in rows:
        if r.get("skipped"):
            seed.append([r["technique"], f"skipped: {r['skipped']}"] + ["—"] * 7)
            more.append([r["technique"], "skipped"] + ["—"] * 10)
            continue
        seed.append([r["technique"], f(r.get("latency_s_mean")), f(r.get("latency_s_p99")), f(r.get("samples_per_s")), f(r.get("peak_memory_mb"), ".1f"),
                     *(f(r.get(k), ".4f") for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))])
        ci = f"[{r['rougeL_low']:.4f}, {r['rougeL_high']:.4f}]" if finite(r.get("rougeL_low")) else "—"
        more.append([r["technique"], f(r.get("latency_s_p50")), f(r.get("latency_s_p90")), f(r.get("ttft_s_p50"), ".4f"), f(r.get("tpot_s_p50"), ".4f"),
                     f(r.get("tokens_per_s"), ".1f"), f(r.get("weight_mb"), ".1f"), f(r.get("peak_memory_ratio"), ".2f") + "×", ci, delta(r), fidelity(r), extras(r)])
    measures = sorted({r["memory_measure"] for r in rows if r.get("memory_measure")})
    return "\n\n".join([table(SEED_COLS, seed), f"Max Memory is {' / '.join(measures) or 'n/a'} during the timed run (each technique runs in its own process).",
                        table([c.format(confidence) for c in MORE_COLS], more),
                        f"ΔROUGE-L is the mean per-row difference to baseline on the same rows with a paired bootstrap {confidence:.0%} CI; "
                        "'no significant difference' means the CI spans 0. Fidelity: headlines identical to the reference technique's, k/n."])


def lossless(rows: list[Row]) -> str:
    diff = [r for r in rows if r.get("reference") and r["reference"] != r["technique"] and finite(r.get("fidelity")) and r["fidelity"] < 1]
    checked = [r["technique"] for r in rows if r.get("reference") and r["reference"] != r["technique"] and finite(r.get("fidelity"))]
    if not diff:
        return f"Every technique checked against its reference ({', '.join(checked) or 'none'}) produced identical headlines."
    out = []
    for r in diff:
        d = r.get("first_difference") or {}
        out.append(f"- **{r['technique']}**: {r['compared'] - r['identical']}/{r['compared']} headlines differ from {r['fidelity_reference']}; "
                   f"first on `{d.get('id')}`: \"{cell(d.get('prediction'))}\" vs \"{cell(d.get('reference_prediction'))}\"")
    return "\n".join(out)


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


def recommendations(recs: list[Row], confidence: float) -> str:
    picks = [f"- **{r['scenario']}: {r['choice'] or 'none'}** ({r['value']}). Rule: {r['rule']}." + (f" Note: {r['note']}." if r.get("note") else "")
             for r in recs]
    return "\n".join([f"Eligible: ran here, and {NOT_WORSE_DEF.format(confidence)}. Skipped techniques are never chosen.", "", *picks])


def environment(perfs: dict[str, dict[str, Any]], prepare: dict[str, Any], rows: list[Row]) -> str:
    ran = [p for p in perfs.values() if not p.get("skipped") and p.get("env")]
    env = ran[0]["env"] if ran else next((p["env"] for p in perfs.values() if p.get("env")), {})
    models = {p["model"]["name"]: p["model"] for p in ran if p.get("model")}
    cpu = f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores)"
    device = env.get("device", "?") if str(env.get("device", "")).startswith("cpu") else f"{env.get('device', '?')}, {env.get('gpu_count', '?')} GPU(s); CPU {cpu}"
    lines = [f"- Device: {device}; torch threads {env.get('torch_threads', '?')}",
             f"- Python {env.get('python', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"]
    for m in models.values():
        pin = f"GGUF {m['gguf']} sha256 {m['sha256']}" if m.get("gguf") else f"revision {m.get('revision', '?')}"
        lines.append(f"- Model {m['name']}: {m.get('id')}, {pin}, {m.get('params', 0) / 1e6:.1f}M params, {m.get('dtype')}")
    samples = sorted({r["samples"] for r in rows if finite(r.get("samples"))})
    lines.append(f"- Data: {prepare.get('source', '?')}, {prepare.get('rows_sampled', '?')} rows sampled of {prepare.get('rows_valid', '?')} valid; "
                 f"samples per technique: {', '.join(map(str, samples)) or 'n/a'}")
    return "\n".join(lines)


def report(names: list[str], perfs: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]], prepare: dict[str, Any],
           generations: dict[str, list[Row]], focus: str, sample_headlines_n: int, balanced_rougeL_within: float,
           confidence: float) -> dict[str, Any]:
    """Build every report output from metrics already on disk and write them.

    Args:
        names: technique names in params.yaml order.
        perfs / scores: perf.json / score.json contents by technique.
        prepare: metrics/prepare.json.
        generations: generation records by technique (latency CDF, sample headlines).
        focus: params `technique`, the one focus.json and "What changed" describe.
        sample_headlines_n: example rows to show.
        balanced_rougeL_within: ROUGE-L tolerance of the balanced recommendation.
        confidence: level of score's paired ΔROUGE-L interval (params score.confidence), for the labels.
    """
    rows = [headline(n, perfs.get(n, {}), scores.get(n, {})) for n in names]
    by = {r["technique"]: r for r in rows}
    base_mem = by.get("baseline", {}).get("peak_memory_mb")
    for r in rows:
        if finite(r.get("peak_memory_mb")) and finite(base_mem) and base_mem:
            r["peak_memory_ratio"] = r["peak_memory_mb"] / base_mem
    front = pareto_front(rows, "latency_s_p50", "rougeL")
    recs = recommend(rows, balanced_rougeL_within)
    from charts import write_charts  # lazy: matplotlib is the heaviest import here

    write_charts(rows, generations, front, PLOTS)
    sections = [f"# Headline generation: inference techniques benchmark (focus: {focus})", environment(perfs, prepare, rows)]
    if focus != "baseline":
        sections += [f"## What changed: {focus} vs baseline", what_changed(by, focus)]
    sections += ["## Results", results_tables(rows, confidence), f"Pareto front (P50 latency vs ROUGE-L): {', '.join(front) or 'none'}.",
                 "## Lossless check", lossless(rows), "## Sample headlines", sample_headlines(generations, focus, sample_headlines_n),
                 "## Recommendations", recommendations(recs, confidence), "## Charts", "![Latency vs ROUGE-L](plots/pareto.png)", "![Peak memory](plots/memory.png)",
                 "![Latency CDF](plots/latency_cdf.png)"]
    # --- serving under load (issue 13): the serve_report stage's section, when it has run ---
    from serve_report import serving_section

    serving = serving_section()
    sections += [serving] if serving else []
    # --- end serving ---
    REPORT.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    env = next((p["env"] for p in perfs.values() if p.get("env") and not p.get("skipped")), {})
    summary = {"focus": focus, "env": env, "prepare": prepare, "pareto_front": front, "recommendations": recs,
               "techniques": {r["technique"]: {k: v for k, v in r.items() if k not in ("technique", "first_difference")} for r in rows}}
    write_json(SUMMARY, clean(summary))
    t = by[focus]
    write_json(FOCUS, clean({"technique": focus, "skipped": t["skipped"]} if t.get("skipped") else {"technique": focus} | {k: t.get(k) for k in FOCUS_KEYS}))
    log.info("report: recommendations: %s", ", ".join(f"{r['scenario']}={r['choice']}" for r in recs))
    log.info("report: %d techniques -> %s, %s, %s, %s/", len(rows), REPORT, SUMMARY, FOCUS, PLOTS)
    return summary


def load(path: Path, name: str) -> dict[str, Any]:
    return read_json(path) if path.exists() else {"technique": name, "skipped": f"{path} missing (stage not run)"}


def main() -> None:
    setup_logging()
    params = load_params()
    names, focus, p = list(params["techniques"]), params["technique"], params["report"]
    if focus not in names:
        fail(f"params.yaml: technique '{focus}' is not one of techniques ({', '.join(names)})")
    perfs = {n: load(TECHNIQUE_METRICS / n / "perf.json", n) for n in names}
    scores = {n: load(TECHNIQUE_METRICS / n / "score.json", n) for n in names}
    gens = {n: read_jsonl(GENERATIONS / f"{n}.jsonl") for n in names if (GENERATIONS / f"{n}.jsonl").exists()}
    report(names, perfs, scores, read_json(METRICS / "prepare.json"), gens, focus, p["sample_headlines"], p["balanced_rougeL_within"],
           params["score"]["confidence"])


if __name__ == "__main__":
    main()
