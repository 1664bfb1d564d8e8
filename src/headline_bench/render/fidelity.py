"""The report's "Fidelity to baseline" section: teacher-forced measures beside the ROUGE state, and which one decided."""

from __future__ import annotations

from typing import Any

from headline_bench.analysis.stats import finite
from headline_bench.render.markdown import table

COLUMNS = ("kl_mean", "kl_p99", "top1", "nll_delta")  # fidelity.json's measures, in the table's order
ROUGE_DECIDED = ("non-inferior", "worse", "equivalent")
FIDELITY_DECIDED = ("within bound", "beyond bound")


def decided_by(rouge: str | None, fidelity: str | None) -> str:
    """Which state decides a technique, in words: both, one of them (naming the other's), or neither."""
    r, f = rouge in ROUGE_DECIDED, fidelity in FIDELITY_DECIDED
    if r and f:
        return "both"
    if f:
        return f"fidelity (ROUGE {rouge or 'n/a'})"
    if r:
        return f"ROUGE (fidelity {fidelity or 'n/a'})"
    return "neither"


def state_of(fid: dict[str, Any]) -> str:
    """A fidelity.json's state, or why it has none (not measured, skipped, failed, missing)."""
    for key in ("fidelity_state", "not_measured", "skipped", "failed"):
        if fid.get(key):
            return str(fid[key]) if key in ("fidelity_state", "not_measured", "skipped") else f"FAILED: {fid[key]}"
    return "n/a: fidelity stage not run"


def cell(m: dict[str, Any] | None, spec: str) -> str:
    if not m or not finite(m.get("value")):
        return "—"
    ci = f" [{m['low']:{spec}}, {m['high']:{spec}}]" if finite(m.get("low")) else ""
    return f"{m['value']:{spec}}{ci} {m.get('state', '')}".rstrip()


def fidelity_section(names: list[str], fids: dict[str, dict[str, Any]], rouge_states: dict[str, str | None]) -> str:
    """One line per technique that has a ROUGE or fidelity state: both states, the measures with their intervals, and
    which state decided. Techniques not measured (baseline, lossless, another model) are listed with the reason."""
    body, absent = [], []
    for name in names:
        fid = fids.get(name) or {}
        if fid.get("not_measured"):
            absent.append(f"{name} ({fid['not_measured']})")
            continue
        state = state_of(fid)
        rouge = rouge_states.get(name)
        body.append([name, rouge or "—", f"**{state}**", cell(fid.get("kl_mean"), ".4f"), cell(fid.get("kl_p99"), ".3f"),
                     cell(fid.get("top1"), ".3f"), cell(fid.get("nll_delta"), "+.4f"), fid.get("rows", "—"), decided_by(rouge, fid.get("fidelity_state"))])
    bounds = next((f for f in fids.values() if f.get("kl_mean")), None)
    measures = [m for m in COLUMNS if bounds and isinstance(bounds.get(m), dict)]
    rule = ("bounds: " + ", ".join(f"{m} {'<=' if bounds[m].get('worse') == 'max' else '>='} {bounds[m]['bound']:g}" for m in measures)) if bounds else "no bounds recorded"
    decide = bounds.get("decided_by", []) if bounds else []
    level = f"{bounds['interval_level']:.4f}" if bounds and finite(bounds.get("interval_level")) else "—"
    text = ("Teacher-forced over baseline's greedy headlines (one forward pass per row, no generation), as llama.cpp's "
            "`llama-perplexity --kl-divergence`: per-token KL(baseline || technique) in nats (row mean; and the 99th percentile over all "
            "positions), the share of positions whose top token is baseline's, and the added NLL per token of the reference headline. "
            f"Intervals at the simultaneous level {level} (Bonferroni over the lossy family and the deciding measures: "
            f"{', '.join(decide) or '—'}): row means by the paired t interval, each end widened to Hall's skewness-corrected t; KL p99 by a "
            "percentile bootstrap over whole rows, whose upper end simulations show too low too often (tests/test_fidelity_sim.py), so "
            "KL p99 is a screen: it can show a technique beyond its bound, never within it. A measure is **within bound** when its "
            "interval lies on the good side of its bound, **beyond** when it lies past it, else inconclusive; a technique is beyond when "
            "any deciding measure is, within when every deciding measure but the screen is and the screen is not beyond; the other "
            "measures' states are shown beside, for information (" + rule + "). "
            "KL uses baseline's top-k tokens with the rest lumped: a lower bound of the full KL. Decided by: which of the ROUGE state "
            "(Quality verdicts) and the fidelity state reached a decision.")
    parts = [text, table(["Technique", "ROUGE state", "Fidelity state", "KL mean [CI]", "KL p99 [CI]", "Top-1 agreement [CI]", "ΔNLL [CI]", "Rows",
                          "Decided by"], body) if body else "No technique has a fidelity measure."]
    if absent:
        parts.append("Not measured: " + "; ".join(absent) + ".")
    return "\n\n".join(parts)
