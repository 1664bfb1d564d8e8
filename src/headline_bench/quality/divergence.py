"""Fidelity to baseline by teacher forcing, as llama.cpp's `llama-perplexity --kl-divergence` measures its quantizations.

Both models read the same tokens (the prompt, then baseline's greedy headline; separately the prompt, then the
data set's reference headline) in one forward pass per sequence, without generating. At every position predicting a
headline token we compare the next-token distributions:
- KL(baseline || technique) in nats. Baseline's distribution is stored as its top-k log-probabilities plus the mass of
  the rest (fidelity_reference stage), so the KL is taken over the partition {each of baseline's top-k tokens, every
  other token lumped}: by the log-sum inequality a lower bound of the full-vocabulary KL, equal to it when the
  technique scales the tail uniformly; `tail_mass` in fidelity.json says how much mass the lumping touches.
- top-1 agreement: the technique's argmax is baseline's argmax (exact: baseline's argmax is in its top k).
- ΔNLL: the technique's mean negative log-likelihood per token of the reference headline minus baseline's (exact).
Rows are the unit: each measure is a per-row value (KL: the row's mean over its positions) whose mean over rows has the
interval ROUGE differences have (analysis/stats.mean_interval: paired t, each end widened to Hall's skewness-corrected
t); the 99th percentile of KL over all positions is bootstrapped by resampling whole rows (percentile interval).

Why these methods (tests/test_fidelity_sim.py, on per-row KL shaped like the measured rows: gamma or lognormal
per-position KL, a lognormal row scale, 10-24 positions a row, a few rows 5x worse): per-row KL is right-skewed, and
at the family's level (0.9975) a percentile bootstrap's upper end lies below the true mean ~4-8x as often as it should
at 50 rows; mean_interval's within 1.5x at 100 rows (~2x at 30-50: hence fidelity.min_rows 100). The bootstrap of
the 99th percentile misses far worse on the upper side (its upper end is capped by the few largest positions seen: 4x at 95%,
20-50x at 0.9975) and is conservative on the lower side, so kl_p99 may put a technique beyond its bound but never
certifies it within (SCREENS).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from headline_bench.analysis.stats import INTERVAL_METHOD, finite, interval, mean_interval

# per-row measures and the direction in which each gets worse: "max": larger is worse, "min": smaller is worse
MEASURES = {"kl_mean": "max", "kl_p99": "max", "top1": "min", "nll_delta": "max"}
FIDELITY_STATES = ("within bound", "beyond bound", "inconclusive", "too few rows")
# measures whose interval is trusted on one side only: their upper end is too low too often (see the module docstring),
# so they can show a technique beyond its bound, never within it
SCREENS = ("kl_p99",)
NOT_BEYOND = "not beyond bound"  # a screen's state when its lower end does not clear the bound
METHODS = {m: f"{INTERVAL_METHOD}, over rows" for m in MEASURES if m not in SCREENS} | {
    m: "percentile bootstrap over whole rows (a screen: its upper end is not trusted)" for m in SCREENS}


def reference_topk(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Baseline's distribution at each position, stored compactly: top-k token ids and log-probs (the rest's mass
    follows from them). logits [T, V] -> ids [T, k] (int32), logp [T, k] (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return {"ids": top.indices.to(torch.int32), "logp": top.values}


def lumped_kl(ref_ids: torch.Tensor, ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(baseline || technique) per position over {baseline's top-k tokens, the rest lumped}, and the rest's mass.

    Args:
        ref_ids / ref_logp: [T, k] from reference_topk().
        logits: [T, V] the technique's logits at the same positions.

    Returns:
        kl [T] (nats, >= 0), tail [T] (baseline's probability outside its top k).
    """
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref_ids.long())  # [T, k]
    p = ref_logp.exp()
    tail_p = (1 - p.sum(-1)).clamp(min=0)
    tail_q = (1 - logq.exp().sum(-1)).clamp(min=0)
    kl = (p * (ref_logp - logq)).sum(-1)
    lumped = torch.where(tail_p > 0, tail_p * (tail_p.clamp(min=1e-30).log() - tail_q.clamp(min=1e-30).log()), torch.zeros_like(tail_p))
    return (kl + lumped).clamp(min=0), tail_p


def token_nll(logits: torch.Tensor, targets: list[int]) -> float:
    """Mean negative log-likelihood per token (nats) of `targets` under logits [T, V] (position t predicts targets[t])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-logp.gather(-1, torch.tensor(targets, device=logp.device).view(-1, 1)).mean())


def row_measures(ref: dict[str, Any], logits: torch.Tensor, gold_logits: torch.Tensor) -> dict[str, Any]:
    """One row's measures from the technique's logits and baseline's stored reference.

    Args:
        ref: {"ids", "logp"} [T, k] at the positions predicting baseline's headline, "nll": baseline's mean NLL of the
            reference headline, "gold": its token ids.
        logits: [T, V] the technique's logits at the positions predicting baseline's headline.
        gold_logits: [G, V] at the positions predicting the reference headline.
    """
    ids, logp = torch.as_tensor(ref["ids"]), torch.as_tensor(ref["logp"])
    logits, gold_logits = logits.float().cpu(), gold_logits.float().cpu()  # the stored reference lives on the CPU
    kl, tail = lumped_kl(ids, logp, logits)
    agree = logits.argmax(-1) == ids[:, 0].long()
    return {"kl": [float(x) for x in kl], "kl_mean": float(kl.mean()), "top1": float(agree.float().mean()),
            "nll_delta": token_nll(gold_logits, ref["gold"]) - float(ref["nll"]), "tail_mass": float(tail.mean()), "positions": int(kl.numel())}


def bootstrap_p99(rows: list[dict[str, Any]], n_samples: int, seed: int) -> np.ndarray:
    """kl_p99 over n_samples resamples of whole rows: the 99th percentile of every resampled row's per-position KL pooled."""
    picks = np.random.default_rng(seed).integers(0, len(rows), size=(n_samples, len(rows)))  # [resamples, rows]
    return pooled_quantiles([np.asarray(r["kl"], dtype=float) for r in rows], 0.99, picks)


def pooled_quantiles(values: list[np.ndarray], q: float, picks: np.ndarray, chunk: int = 500) -> np.ndarray:
    """np.quantile(np.concatenate([values[i] for i in pick]), q) for every row of `picks`, without building the pooled
    arrays: the positions are sorted once and weighted by how often each resample drew their row; the k-th pooled order
    statistic is the first sorted position whose cumulative weight exceeds k (numpy's default linear interpolation
    between the two order statistics around (N - 1) q). Why: a Python loop over 10,000 concatenations cost seconds per
    technique and made the simulation that checks this interval (tests/test_fidelity_sim.py) too slow to run.

    Args:
        values: per row, its per-position values.
        picks: [resamples, rows drawn] row indices.
    """
    lengths = np.asarray([len(v) for v in values])
    flat = np.concatenate(values)
    order = np.argsort(flat, kind="stable")
    flat, row_of = flat[order], np.repeat(np.arange(len(values)), lengths)[order]
    out = np.empty(len(picks))
    for start in range(0, len(picks), chunk):
        p = picks[start:start + chunk]
        r = len(p)
        counts = np.bincount((p + len(values) * np.arange(r)[:, None]).ravel(), minlength=r * len(values)).reshape(r, len(values))
        total = counts @ lengths
        h = (total - 1) * q
        k = np.floor(h).astype(np.int64)
        cum = np.cumsum(counts[:, row_of], axis=1)  # [resamples, positions]: pooled count up to each sorted position
        j0 = (cum <= k[:, None]).sum(axis=1)
        j1 = (cum <= np.minimum(k + 1, total - 1)[:, None]).sum(axis=1)
        out[start:start + r] = flat[j0] + (h - k) * (flat[j1] - flat[j0])
    return out


def decide_measure(low: float, high: float, bound: float, worse: str, screen: bool = False) -> str:
    """The three-state rule of ROUGE, against a bound instead of a margin: within when the whole interval is on the
    good side of the bound, beyond when the whole interval is past it, else inconclusive. A screen (SCREENS) is only
    ever beyond or NOT_BEYOND: its upper end is not trusted."""
    if worse == "max":
        beyond, within = low > bound, high <= bound
    else:
        beyond, within = high < bound, low >= bound
    if screen:
        return "beyond bound" if beyond else NOT_BEYOND
    return "beyond bound" if beyond else "within bound" if within else "inconclusive"


def combine(states: dict[str, str]) -> str:
    """A technique's fidelity state from its deciding measures' (measure -> state): beyond when any is beyond its
    bound; within when every measure that can certify it (not a screen) is within and no screen is beyond; else
    inconclusive. Screens alone decide nothing but "beyond"."""
    if "beyond bound" in states.values():
        return "beyond bound"
    certifying = [s for m, s in states.items() if m not in SCREENS]
    return "within bound" if certifying and all(s == "within bound" for s in certifying) else "inconclusive"


def summarize(rows: list[dict[str, Any]], bounds: dict[str, float], level: float, n_samples: int, seed: int, min_rows: int,
              decide: list[str]) -> dict[str, Any]:
    """Every measure's point value and interval over rows at `level` (METHODS), its state against its bound, and the
    technique's fidelity state from the `decide` measures (combine()); "too few rows" below min_rows.

    Args:
        rows: row_measures() per row.
        bounds: per measure in MEASURES (params fidelity.bounds).
        level: two-sided level of each interval (the caller applies Bonferroni over techniques and deciding measures).
        n_samples / seed: kl_p99's bootstrap.
        decide: the measures whose states make the technique's (params fidelity.decide); the others are reported beside.
    """
    pooled = np.concatenate([np.asarray(r["kl"], dtype=float) for r in rows]) if rows else np.zeros(0)
    point = {m: float(np.mean([r[m] for r in rows])) if rows else None for m in MEASURES if m != "kl_p99"}
    point["kl_p99"] = float(np.quantile(pooled, 0.99)) if pooled.size else None
    out: dict[str, Any] = {"rows": len(rows), "positions": int(pooled.size), "interval_level": level,
                           "tail_mass": float(np.mean([r["tail_mass"] for r in rows])) if rows else None}
    if len(rows) < min_rows:
        return out | {m: {"value": point[m], "bound": bounds[m], "worse": worse} for m, worse in MEASURES.items()} | {"fidelity_state": "too few rows"}
    for m, worse in MEASURES.items():
        if m in SCREENS:
            low, high = interval(bootstrap_p99(rows, n_samples, seed), level)
        else:
            t = mean_interval(np.asarray([r[m] for r in rows], dtype=float), level)
            low, high = t["low"], t["high"]
        out[m] = {"value": point[m], "low": low, "high": high, "bound": bounds[m], "worse": worse, "method": METHODS[m],
                  "state": decide_measure(low, high, bounds[m], worse, screen=m in SCREENS)}
    return out | {"fidelity_state": combine({m: out[m]["state"] for m in decide}), "decided_by": list(decide)}


def all_finite(row: dict[str, Any]) -> bool:
    return all(finite(row.get(m)) for m in MEASURES if m != "kl_p99")
