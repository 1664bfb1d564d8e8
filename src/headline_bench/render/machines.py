"""The techniques x machines table (analysis/machines.py's columns) as markdown and a chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headline_bench.analysis.machines import CONFIDENCE, time_per_token
from headline_bench.analysis.stats import finite
from headline_bench.render.markdown import f, table


def fmt_interval(c: dict[str, Any], key: str, spec: str) -> str:
    if not finite(c.get(key)):
        return "—"
    lo, hi = c.get(f"{key}_low"), c.get(f"{key}_high")
    return f"{f(c[key], spec)} [{f(lo, spec)}, {f(hi, spec)}]" if finite(lo) and finite(hi) else f(c[key], spec)


def usual_threads(col: dict[str, Any]) -> dict[str, Any]:
    """The thread settings most of a column's techniques ran with (the machine's, as opposed to a technique's own)."""
    seen = [json.dumps(x["threads"], sort_keys=True) for x in col["cells"].values() if "threads" in x]
    return json.loads(max(set(seen), key=seen.count)) if seen else {}


def threads_text(t: dict[str, Any]) -> str:
    return f"torch threads {t.get('torch_threads')}, OMP_NUM_THREADS {t.get('omp_num_threads') or 'unset'}"


def markdown(cols: list[dict[str, Any]], refs: list[str], sources: list[str]) -> str:
    techniques = sorted({t for c in cols for t in c["cells"]})
    head = ["technique", *(c["id"] for c in cols)]

    def grid(show: Any) -> str:
        rows = []
        for t in techniques:
            cells = [c["cells"].get(t) for c in cols]
            rows.append([t, *("not in this run" if x is None else x["outcome"] if x["outcome"] != "ran" else show(x) for x in cells)])
        return table(head, rows)

    def tpot(x: dict[str, Any]) -> str:
        return f"{fmt_interval(x, 'tpot_ms', '.2f')}; mean {fmt_interval(x, 'tpot_mean_ms', '.2f')}" if finite(x.get("tpot_ms")) else "—"

    def vs(x: dict[str, Any]) -> str:
        parts = [f"{f(x[f'vs_{r}']['ratio'], '.2f')}{'*' if x[f'vs_{r}']['basis'] != 'TPOT' else ''}" if f"vs_{r}" in x else "—" for r in refs]
        return " / ".join(parts)

    lines = ["# One table across machines", "", f"Sources: {', '.join(f'`{s}`' for s in sources)}. Columns (one machine of one source, "
             "named by its environment fingerprint):", ""]
    for c in cols:
        m = c["machine"]
        lines.append(f"- **{c['id']}**: {c['title']} (source `{c['source']}`; CPU {m.get('cpu_id')}, ISA {m.get('cpu_isa')}; "
                     f"Python {m.get('python')}; {threads_text(usual_threads(c))})")
    for c in cols:
        versions = sorted({str(v) if k == "engine" else f"{k} {v}" for x in c["cells"].values() for k, v in x.get("versions", {}).items() if v is not None})
        lines.append(f"- {c['id']} engines and other versions: {', '.join(versions) or 'none recorded'}")
    own = [f"{c['id']} {t}: {threads_text(x['threads'])}" for c in cols for t, x in c["cells"].items() if "threads" in x and x["threads"] != usual_threads(c)]
    lines += ["", f"Techniques with their own thread settings: {'; '.join(own)}." if own else "Every technique of a column ran with its thread settings.", "",
              f"Intervals: {CONFIDENCE:.0%} t intervals over the timed processes (one number per process) where perf.json has them; the mean "
              "TPOT's falls back to the timed rows (the run-to-run part is then missing). Ratios are within one column, never across machines.", "",
              "## Time per output token, ms (median TPOT [95% CI]; mean [95% CI])", "", grid(tpot), "",
              "## Tokens per second [95% CI]", "", grid(lambda x: fmt_interval(x, "tokens_per_s", ".1f")), "",
              f"## Time per token relative to {' / '.join(refs)} on the same machine (< 1: faster)", "",
              "Median TPOT over median TPOT; `*`: end-to-end time per token on both sides (a side without a TPOT: speculative decoding, prompt lookup).", "",
              grid(vs), "", "## Peak memory, MiB", "", grid(lambda x: f"{f(x.get('peak_mb'), ',.0f')} ({x['peak_kind']})" if "peak_mb" in x else "—"), "",
              "## Quality state (score.json; ROUGE-L)", "",
              grid(lambda x: f"{x.get('quality_state', 'not scored')}" + (f" ({f(x['rougeL'], '.3f')})" if finite(x.get("rougeL")) else ""))]
    missed = [f"- {c['id']} {t}: {x['outcome']}: {x['reason']}" for c in cols for t, x in sorted(c["cells"].items()) if x["outcome"] != "ran"]
    if missed:
        lines += ["", "## Not measured", "", *missed]
    return "\n".join(lines) + "\n"


def plot(cols: list[dict[str, Any]], path: Path) -> None:
    """Grouped horizontal bars: median TPOT (end-to-end ms per token without one) per technique, one bar per column,
    its 95% CI as error bars where perf.json has per-process medians (log scale)."""
    import matplotlib.pyplot as plt

    from headline_bench.render.charts import latency_axis, save

    techniques = sorted({t for c in cols for t, x in c["cells"].items() if time_per_token(x)[0] is not None})
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.35 * max(len(techniques), 1) * max(len(cols), 1)))
    height = 0.8 / max(len(cols), 1)
    values = []
    for i, c in enumerate(cols):
        ys, xs, errs = [], [], [[], []]
        for j, t in enumerate(techniques):
            x = c["cells"].get(t, {})
            value, basis = time_per_token(x)
            if value is None:
                continue
            lo, hi = (x.get("tpot_ms_low"), x.get("tpot_ms_high")) if basis == "TPOT" else (None, None)
            ys.append(j + i * height)
            xs.append(value)
            errs[0].append(value - lo if finite(lo) else 0)
            errs[1].append(hi - value if finite(hi) else 0)
        ax.barh(ys, xs, height=height, xerr=errs, capsize=2, label=f"{c['id']}: {c['title']}")
        values += xs
    latency_axis(ax, values, "ms per output token (median TPOT; end-to-end for techniques without one{}) — lower is better")
    ax.set(yticks=[j + height * (len(cols) - 1) / 2 for j in range(len(techniques))], yticklabels=techniques,
           title="Time per token per technique and machine")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False, fontsize=8)
    save(fig, path)
