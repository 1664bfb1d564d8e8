"""Near-tie calibration: the reference model's own numeric noise in the relative top-2 logit margin.

The lossless check calls a differing token a near-tie when the reference's relative top-2 margin
(top1 - top2) / max(1, |top1|) at that step is within numeric noise. This measures that noise: the greedy
continuations of real prompts are scored three mathematically equivalent ways (one sequence at a time without a
cache; eight at a time with left padding; token by token with a KV cache: what `baseline`, `batched` and `kv_cache`
do), and at every generated position the margin between the same two tokens is compared across the ways. A margin
smaller than the noise can flip which token wins; the threshold is where an exponential tail fitted to |margin_a -
margin_b| puts the chance of any noise above it in a whole check at a stated alpha (tail_threshold).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def relative_margin(logits: torch.Tensor, top2: torch.Tensor) -> torch.Tensor:
    """(l[t1] - l[t2]) / max(1, |l[t1]|) for the given token pair per position. logits [T, V], top2 [T, 2] -> [T]."""
    pair = logits.float().gather(-1, top2)  # [T, 2]
    return (pair[:, 0] - pair[:, 1]) / pair[:, 0].abs().clamp(min=1.0)


@torch.inference_mode()
def margin_noise(model: Any, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int = 8) -> dict[str, list[np.ndarray]]:
    """|Δ relative margin| at each generated position between the three ways of scoring the same tokens.

    Args:
        model: the reference model, in the dtype being calibrated.
        sequences: (prompt + generated token ids, prompt length) per row.
        pad_id: the tokenizer's pad id (left padding, with an attention mask, as the batched technique uses).
        batch_size: rows per padded batch.

    Returns:
        {"batched": [...], "kv_cache": [...]}: noise against the unbatched, uncached scoring, one array per row (a value per position).
    """
    dev = next(model.parameters()).device

    def t(x: list[Any]) -> torch.Tensor:
        return torch.tensor(x, device=dev)
    single = []  # per row: logits [T, V] predicting each generated token (positions prompt_len-1 .. end-1)
    for ids, n in sequences:
        out = model(t([ids]), use_cache=False).logits[0]  # [S, V]
        single.append(out[n - 1 : len(ids) - 1])
    batched: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = t([[pad_id] * (width - len(s)) + s for s, _ in chunk])  # [B, W]
        mask = t([[0] * (width - len(s)) + [1] * len(s) for s, _ in chunk])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits  # [B, W, V]
        for b, (s, n) in enumerate(chunk):
            off = width - len(s)
            batched.append(out[b, off + n - 1 : off + len(s) - 1])
    cached = []
    for ids, n in sequences:
        out = model(t([ids[:n]]), use_cache=True)
        steps, past = [out.logits[0, -1]], out.past_key_values
        for tok in ids[n:-1]:
            out = model(t([[tok]]), past_key_values=past, use_cache=True)
            steps.append(out.logits[0, -1])
            past = out.past_key_values
        cached.append(torch.stack(steps))
    noise: dict[str, list[np.ndarray]] = {"batched": [], "kv_cache": []}
    for ref, bat, kv in zip(single, batched, cached):
        top2 = ref.float().topk(2, dim=-1).indices  # [T, 2]: the reference's top-2 pair, held fixed across the ways
        base = relative_margin(ref, top2)
        noise["batched"].append((relative_margin(bat, top2) - base).abs().numpy())
        noise["kv_cache"].append((relative_margin(kv, top2) - base).abs().numpy())
    return noise


# the exponential tail is fitted to the values above this quantile
TAIL_FROM = 0.9


def tail_threshold(values: np.ndarray, alpha: float, n: int) -> float:
    """The value that none of n draws exceeds with probability ~1 - alpha, from an exponential fitted to the tail.

    A raw quantile cannot say this: a 30-row check has ~600 positions, so alpha = 0.01 needs the 1 - 1.7e-5
    quantile, far beyond what ~1,000 calibration values show (their 0.999 quantile is about the 2nd largest, and a
    check exceeds it about half the time by chance). Peaks over threshold instead: above u = the TAIL_FROM quantile
    the excesses are taken as exponential with their mean as scale, so P(X > t) = p_u exp(-(t - u) / scale), and
    n x P(X > t) = alpha gives t = u + scale x ln(n p_u / alpha) (a union bound over the n draws). A tail heavier than
    exponential would make this optimistic; the calibration entry keeps the largest value seen beside it.
    """
    x = np.asarray(values, dtype=float)
    u = float(np.quantile(x, TAIL_FROM))
    over = x[x > u] - u
    if not over.size:
        return u
    share = over.size / x.size
    return u + float(over.mean()) * max(0.0, float(np.log(n * share / alpha)))


def calibration_entry(noise: dict[str, list[np.ndarray]], model_name: str, alpha: float, check_rows: int, check_positions: int,
                      rows: list[str]) -> dict[str, Any]:
    """The calibration file's entry for one model, device kind and dtype.

    threshold: no position of a check of `check_positions` positions carries numeric noise above it, with probability
    ~1 - alpha (tail_threshold over all pooled positions). row_cap: no row of a check of `check_rows` rows has a 0.9
    quantile of noise above it, with probability ~1 - alpha (the lossless check's per-row perturbation statistic).
    `rows`: the ids of the rows measured (never the rows a check judges)."""
    pooled = np.concatenate([a for arrays in noise.values() for a in arrays])
    per_row = np.asarray([float(np.quantile(a, 0.9)) for arrays in noise.values() for a in arrays if a.size])
    qs = {f"q{q:g}": float(np.quantile(pooled, q)) for q in (0.5, 0.9, 0.99, 0.999)}
    return {"threshold": tail_threshold(pooled, alpha, check_positions), "row_cap": tail_threshold(per_row, alpha, check_rows), "alpha": alpha,
            "check_positions": check_positions, "check_rows": check_rows, "positions": int(pooled.size), "rows": len(rows), "row_ids": rows,
            "model": model_name, "max": float(pooled.max()), "row_q0.9_max": float(per_row.max()), "share_nonzero": float((pooled > 0).mean()), **qs,
            "by_way": {k: {"positions": int(sum(a.size for a in v)), "max": float(max(a.max() for a in v))} for k, v in noise.items()}}
