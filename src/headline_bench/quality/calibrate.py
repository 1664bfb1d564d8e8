"""Near-tie calibration: the reference model's own numeric noise in the relative top-2 logit margin.

The lossless check calls a differing token a near-tie when the reference's relative top-2 margin
(top1 - top2) / max(1, |top1|) at that step is within numeric noise. This measures that noise: the greedy
continuations of real prompts are scored three mathematically equivalent ways (one sequence at a time without a
cache; eight at a time with left padding; token by token with a KV cache: what `baseline`, `batched` and `kv_cache`
do), and at every generated position the margin between the same two tokens is compared across the ways. A margin
smaller than the noise can flip which token wins; the threshold is a stated high quantile of |margin_a - margin_b|.
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
def margin_noise(model: Any, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    """|Δ relative margin| at each generated position between the three ways of scoring the same tokens.

    Args:
        model: the reference model, in the dtype being calibrated.
        sequences: (prompt + generated token ids, prompt length) per row.
        pad_id: the tokenizer's pad id (left padding, with an attention mask, as the batched technique uses).
        batch_size: rows per padded batch.

    Returns:
        {"batched": [...], "kv_cache": [...]}: noise against the unbatched, uncached scoring, one value per position.
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
    noise: dict[str, list[float]] = {"batched": [], "kv_cache": []}
    for ref, bat, kv in zip(single, batched, cached):
        top2 = ref.float().topk(2, dim=-1).indices  # [T, 2]: the reference's top-2 pair, held fixed across the ways
        base = relative_margin(ref, top2)
        noise["batched"] += (relative_margin(bat, top2) - base).abs().tolist()
        noise["kv_cache"] += (relative_margin(kv, top2) - base).abs().tolist()
    return {k: np.asarray(v) for k, v in noise.items()}


def calibration_entry(noise: dict[str, np.ndarray], quantile: float, model_name: str, rows: int) -> dict[str, Any]:
    """The calibration file's entry for one device/dtype: the threshold (the quantile over all pooled positions) and
    the distribution behind it."""
    pooled = np.concatenate(list(noise.values()))
    qs = {f"q{q:g}": float(np.quantile(pooled, q)) for q in (0.5, 0.9, 0.99, 0.999)}
    return {"threshold": float(np.quantile(pooled, quantile)), "quantile": quantile, "positions": int(pooled.size), "rows": rows,
            "model": model_name, "max": float(pooled.max()), "share_nonzero": float((pooled > 0).mean()), **qs,
            "by_way": {k: {"positions": int(v.size), "q0.99": float(np.quantile(v, 0.99)), "max": float(v.max())} for k, v in noise.items()}}
