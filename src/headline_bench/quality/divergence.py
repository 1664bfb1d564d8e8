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
Rows are the unit: each measure is a per-row value (KL: the row's mean over its positions), its mean over rows has a
percentile bootstrap interval over rows, and the 99th percentile of KL over all positions is bootstrapped by
resampling whole rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from headline_bench.analysis.stats import finite, interval

# per-row measures and the direction in which each gets worse: "max": larger is worse, "min": smaller is worse
MEASURES = {"kl_mean": "max", "kl_p99": "max", "top1": "min", "nll_delta": "max"}
FIDELITY_STATES = ("within bound", "beyond bound", "inconclusive", "too few rows")


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


def bootstrap_rows(rows: list[dict[str, Any]], n_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Each measure's value over n_samples resamples of whole rows: means of the per-row measures; kl_p99 as the 99th
    percentile of every resampled row's per-position KL pooled."""
    n = len(rows)
    rng = np.random.default_rng(seed)
    per_row = {m: np.asarray([r[m] for r in rows], dtype=float) for m in MEASURES if m != "kl_p99"}
    picks = rng.integers(0, n, size=(n_samples, n))  # [resamples, rows]
    out = {m: v[picks].mean(axis=1) for m, v in per_row.items()}
    kls = [np.asarray(r["kl"], dtype=float) for r in rows]
    out["kl_p99"] = np.asarray([np.quantile(np.concatenate([kls[i] for i in pick]), 0.99) for pick in picks])
    return out


def decide_measure(low: float, high: float, bound: float, worse: str) -> str:
    """The three-state rule of ROUGE, against a bound instead of a margin: within when the whole interval is on the
    good side of the bound, beyond when the whole interval is past it, else inconclusive."""
    if worse == "max":
        return "within bound" if high <= bound else "beyond bound" if low > bound else "inconclusive"
    return "within bound" if low >= bound else "beyond bound" if high < bound else "inconclusive"


def combine(states: list[str]) -> str:
    """A technique's fidelity state from its measures': beyond when any measure is beyond its bound; within only when
    every measure is within; else inconclusive."""
    if "beyond bound" in states:
        return "beyond bound"
    return "within bound" if states and all(s == "within bound" for s in states) else "inconclusive"


def summarize(rows: list[dict[str, Any]], bounds: dict[str, float], level: float, n_samples: int, seed: int, min_rows: int,
              decide: list[str]) -> dict[str, Any]:
    """Every measure's point value and interval over rows at `level`, its state against its bound, and the
    technique's fidelity state from the `decide` measures (combine()); "too few rows" below min_rows.

    Args:
        rows: row_measures() per row.
        bounds: per measure in MEASURES (params fidelity.bounds).
        level: two-sided level of each interval (the caller applies Bonferroni over techniques and deciding measures).
        decide: the measures whose states make the technique's (params fidelity.decide); the others are reported beside.
    """
    pooled = np.concatenate([np.asarray(r["kl"], dtype=float) for r in rows]) if rows else np.zeros(0)
    point = {m: float(np.mean([r[m] for r in rows])) if rows else None for m in MEASURES if m != "kl_p99"}
    point["kl_p99"] = float(np.quantile(pooled, 0.99)) if pooled.size else None
    out: dict[str, Any] = {"rows": len(rows), "positions": int(pooled.size), "interval_level": level,
                           "tail_mass": float(np.mean([r["tail_mass"] for r in rows])) if rows else None}
    if len(rows) < min_rows:
        return out | {m: {"value": point[m], "bound": bounds[m], "worse": worse} for m, worse in MEASURES.items()} | {"fidelity_state": "too few rows"}
    dist = bootstrap_rows(rows, n_samples, seed)
    for m, worse in MEASURES.items():
        low, high = interval(dist[m], level)
        out[m] = {"value": point[m], "low": low, "high": high, "bound": bounds[m], "worse": worse, "state": decide_measure(low, high, bounds[m], worse)}
    return out | {"fidelity_state": combine([out[m]["state"] for m in decide]), "decided_by": list(decide)}


def all_finite(row: dict[str, Any]) -> bool:
    return all(finite(row.get(m)) for m in MEASURES if m != "kl_p99")
