"""Charts for the report: matplotlib PNGs (Agg backend) and the JSON data behind the `dvc plots` definitions.

Reads nothing from disk; report.py hands in the headline rows and generation records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox

from headline_bench.analysis.rows import Row
from headline_bench.analysis.stats import cdf_points, clean, finite
from headline_bench.files import write_json

matplotlib.use("Agg")  # files only; pyplot picks its backend lazily, so this still applies


plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110})


def write_charts(rows: list[Row], generations: dict[str, list[Row]], front: list[str], out: Path) -> None:
    """Pareto, memory and latency-CDF charts as PNGs in `out`, each with the JSON data its dvc plots definition reads.

    Args:
        rows: headline rows (skipped ones are left out of the charts).
        generations: generation records by technique (per-sample latency_s for the CDF).
        front: the techniques on the latency/ROUGE-L Pareto front.
        out: the folder (metrics/plots).
    """
    out.mkdir(parents=True, exist_ok=True)
    ran = [r for r in rows if not r.get("skipped")]
    shades = [plt.cm.tab10(i) for i in range(10)] + [plt.cm.tab20(i) for i in range(1, 20, 2)]  # 10 strong, then 10 light
    color = {r["technique"]: shades[i % 20] for i, r in enumerate(ran)}
    pts = [r for r in ran if finite(r.get("latency_s_p50")) and finite(r.get("rougeL"))]
    write_json(out / "pareto.json", clean({"points": [{k: r.get(k) for k in ("technique", "latency_s_p50", "rougeL", "rougeL_low", "rougeL_high")}
                                                        | {"pareto_front": r["technique"] in front} for r in pts]}))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in pts:
        lo, hi = (r.get(k) if finite(r.get(k)) else r["rougeL"] for k in ("rougeL_low", "rougeL_high"))
        err = [[max(r["rougeL"] - lo, 0)], [max(hi - r["rougeL"], 0)]]
        ax.errorbar(r["latency_s_p50"], r["rougeL"], yerr=err, fmt="o", ms=8, capsize=4, color=color[r["technique"]],
                    mfc=color[r["technique"]] if r["technique"] in front else "white", mew=2)
    fr = sorted((r["latency_s_p50"], r["rougeL"]) for r in pts if r["technique"] in front)
    if fr:
        ax.step(*zip(*fr), where="post", ls="--", color="grey", label="Pareto front (filled points)")
        ax.legend(loc="lower right")
    latency_axis(ax, [r["latency_s_p50"] for r in pts], "P50 latency per sample (s{}) — lower is better")
    ax.set(ylabel="ROUGE-L (bars: 95% bootstrap CI) — higher is better", title="Latency vs quality per technique")
    label_points(ax, [(r["latency_s_p50"], r["rougeL"], r["technique"]) for r in pts])
    save(fig, out / "pareto.png")

    mem = [r for r in ran if finite(r.get("peak_memory_mb"))]
    write_json(out / "memory.json", clean({"memory": [{"technique": r["technique"], "measure": m, "mb": r.get(k)} for r in mem
                                                        for m, k in ((f"peak ({r['memory_measure']})", "peak_memory_mb"), ("weights", "weight_mb"))]}))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * max(len(mem), 1)))
    ys = range(len(mem))
    labels = ["peak memory (" + " / ".join(sorted({r["memory_measure"] for r in mem})) + ")", "model weights"]
    for off, key, label, hatch in ((-0.2, "peak_memory_mb", labels[0], ""),
                                   (0.2, "weight_mb", labels[1], "//")):
        vals = [r.get(key) if finite(r.get(key)) else 0 for r in mem]
        bars = ax.barh([y + off for y in ys], vals, height=0.38, label=label, color=[color[r["technique"]] for r in mem], hatch=hatch,
                       alpha=1 if not hatch else 0.5, edgecolor="black")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], padding=3, fontsize=9)
    ax.set(yticks=list(ys), yticklabels=[r["technique"] for r in mem], xlabel="MB", title="Peak memory and weight size per technique")
    ax.invert_yaxis(), ax.margins(x=0.12)
    ax.legend(handles=[Patch(fc="grey", ec="black", label=labels[0]), Patch(fc="white", ec="black", hatch="//", label=labels[1])],
              loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.25 / max(len(mem), 1)), ncol=2, frameon=False)
    save(fig, out / "memory.png")

    cdf = {t: cdf_points([g.get("latency_s") for g in gens if g.get("prediction") is not None]) for t, gens in generations.items()}
    write_json(out / "latency_cdf.json", {"cdf": [{"technique": t, "latency_s": x, "share": p} for t, pts_ in cdf.items() for x, p in pts_]})
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for t, pts_ in cdf.items():
        if pts_:
            xs, ps = zip(*pts_)
            ax.step([xs[0], *xs], [0, *ps], where="post", label=f"{t} (n={len(xs)})", color=color.get(t), lw=2)
    latency_axis(ax, [x for pts_ in cdf.values() for x, _ in pts_], "latency per sample (s{})")
    ax.set(ylabel="share of samples ≤ latency", ylim=(0, 1.02), title="Latency distribution per technique")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    save(fig, out / "latency_cdf.png")


def latency_axis(ax: Any, values: list[float], label: str) -> None:
    """Log scale only when latencies span more than 10x; plain decimal tick labels either way."""
    log_scale = bool(values) and max(values) > 10 * min(values) > 0
    ax.set(xscale="log" if log_scale else "linear", xlabel=label.format(", log scale" if log_scale else ""))
    if log_scale:
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5))), ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def label_points(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Name each point, trying a few offsets so that labels overlap neither each other nor the markers."""
    ax.figure.tight_layout()
    renderer = ax.figure.canvas.get_renderer()
    taken = [Bbox.from_extents(*(ax.transData.transform((x, y)) - 7), *(ax.transData.transform((x, y)) + 7)) for x, y, _ in points]
    offsets = [(8, 5), (8, -15), (-8, 5), (-8, -15), (8, 22), (-8, 22), (8, -32), (-8, -32), (30, 38), (-30, -48)]
    for x, y, text in sorted(points):
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha="left" if dx > 0 else "right",
                              bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                              arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.7} if abs(dy) > 15 else None)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(t) for t in taken) or (dx, dy) == offsets[-1]:
                taken.append(box)
                break
            ann.remove()


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
