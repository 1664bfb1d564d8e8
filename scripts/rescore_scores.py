"""Re-judge committed score-*.json files under the current quality rule, without generating or scoring again.

A results folder (docs/results/<run>/) keeps each technique's score.json but not its per-row ΔROUGE-L, so this script
rebuilds what the summary numbers allow: the paired t interval from (mean, sd, rows, level), checked against the one
recorded, then today's decide() and rows_to_decide() on it. The current interval (stats.mean_interval) is at least as
wide as the t interval at each end, widened where the rows are skewed (Hall's correction needs their third moment,
which is not committed): an inconclusive state is therefore final, while a non-inferior or worse state holds only if
the correction does not move its deciding end past -margin, and the output says so.

Usage: python scripts/rescore_scores.py docs/results/decide-400   (writes <folder>/rescored.json, prints a table)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from headline_bench.analysis.stats import hall_ends, t_quantile  # noqa: E402
from headline_bench.analysis.verdicts import decide, rows_to_decide  # noqa: E402
from headline_bench.settings import load_params  # noqa: E402


def rescore(score: dict, min_rows: int, power: float) -> dict:
    """Today's state of one committed comparison, from its summary numbers (module docstring)."""
    d, sd, n, level, margin = (score[k] for k in ("rougeL_delta", "rougeL_delta_sd", "rougeL_delta_rows", "interval_level", "noninferiority_margin"))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    lo, hi = d - half, d + half
    if abs(lo - score["rougeL_delta_low"]) > 1e-9 or abs(hi - score["rougeL_delta_high"]) > 1e-9:
        raise ValueError(f"{score['technique']}: the recorded interval is not the paired t interval of its mean, sd and rows")
    state, note = decide(lo, hi, margin, n, min_rows)
    need, would = rows_to_decide(d, sd, margin, level, power, min_rows) if state in ("inconclusive", "too few rows") else (None, None)
    skew = None if state in ("inconclusive", "too few rows") else breaking_skew(d, sd, n, level, margin, state)
    final = state in ("inconclusive", "too few rows") or (f"holds unless the rows' skewness is {skew:+.1f} or beyond" if skew is not None
                                                          else "holds for any skewness within +-20")
    return {"technique": score["technique"], "rows": n, "level": level, "rougeL_delta": d, "t_low": lo, "t_high": hi, "old_state": score["quality_state"],
            "state": state, "note": note, "rows_to_decide": need, "rows_to_decide_state": would,
            "final": final}


def breaking_skew(d: float, sd: float, n: int, level: float, margin: float, state: str) -> float | None:
    """The smallest skewness (in size) of the rows at which Hall's end crosses -margin and undoes the state: negative skew
    lowers the lower end (non-inferior), positive skew raises the upper end (worse). A grid over |skew| <= 20 (Hall's
    inverse is not monotone in the skewness, so no bisection); None when no skewness on it does."""
    end, sign = (0, -1.0) if state == "non-inferior" else (1, 1.0)
    grid = sign * np.linspace(0, 20, 4001)
    ends = np.asarray(hall_ends(np.full_like(grid, d), np.full_like(grid, sd), grid, n, level)[end])
    crossed = ends <= -margin if state == "non-inferior" else ends >= -margin
    return float(grid[np.argmax(crossed)]) if crossed.any() else None


def main(folder: Path) -> None:
    params = load_params().score
    out = [rescore(json.loads(p.read_text()), params.min_rows, params.power) for p in sorted(folder.glob("score-*.json"))
           if json.loads(p.read_text()).get("rougeL_delta_sd") is not None]
    (folder / "rescored.json").write_text(json.dumps({"rule": "analysis/verdicts.py at this commit", "min_rows": params.min_rows, "rescored": out},
                                                     indent=2) + "\n")
    print("| technique | rows | ΔROUGE-L | paired t interval | old state | state now | rows to decide | final? |\n|---|---|---|---|---|---|---|---|")
    for r in out:
        need = f"{r['rows_to_decide']} ({r['rows_to_decide_state']})" if r["rows_to_decide"] else "—"
        note = f" ({r['note']})" if r["note"] else ""
        print(f"| {r['technique']} | {r['rows']} | {r['rougeL_delta']:+.4f} | [{r['t_low']:+.4f}, {r['t_high']:+.4f}] | {r['old_state']} | "
              f"**{r['state']}**{note} | {need} | {'yes' if r['final'] is True else r['final']} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
