"""Near-tie calibration on a tiny random Llama: the three ways of scoring the same tokens agree within numeric noise,
and that noise is larger in bfloat16 than in float32 (so each dtype needs its own threshold); the must-say-real case:
a changed model's differing tokens are not near-ties under the calibrated threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from headline_bench.quality.calibrate import calibration_entry, margin_noise
from headline_bench.quality.fidelity import near_tie_threshold, token_check


def sequences(model: torch.nn.Module, n: int = 10, steps: int = 8) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(0)
    out = []
    with torch.inference_mode():
        for i in range(n):
            prompt = rng.integers(3, 30, 5 + i % 4).tolist()
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
            out.append((ids[0].tolist(), len(prompt)))
    return out


def test_margin_noise_per_dtype_and_the_entry_it_writes(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    noise = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype).eval()
        noise[dtype] = margin_noise(model, sequences(model), pad_id=0, batch_size=4)
        assert {k: v.size for k, v in noise[dtype].items()} == {"batched": 80, "kv_cache": 80}  # 10 rows x 8 generated tokens
        assert all(np.isfinite(v).all() and (v >= 0).all() for v in noise[dtype].values())
    fp32 = np.concatenate(list(noise[torch.float32].values()))
    bf16 = np.concatenate(list(noise[torch.bfloat16].values()))
    assert fp32.max() < 1e-4 and np.quantile(bf16, 0.99) > np.quantile(fp32, 0.99)
    entry = calibration_entry(noise[torch.bfloat16], 0.99, "tiny", 10)
    assert entry["threshold"] == np.quantile(bf16, 0.99) and entry["positions"] == 160 and entry["q0.5"] <= entry["q0.99"] <= entry["max"]


def test_a_changed_model_differs_for_real_under_the_calibrated_threshold(tiny_llama: Path) -> None:
    """The must-say-real check: a lossy change (here: weights perturbed by 20%) must not come out as mostly near-ties."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    seqs = sequences(model, n=20)
    entry = calibration_entry(margin_noise(model, seqs, pad_id=0, batch_size=4), 0.99, "tiny", 20)
    lossy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lossy.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))

    def records(m: torch.nn.Module) -> list[dict]:
        out = []
        with torch.inference_mode():
            for i, (ids, n) in enumerate(seqs):
                g = m.generate(torch.tensor([ids[:n]]), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
                top = torch.stack(g.scores)[:, 0].float().topk(2, dim=-1).values  # [T, 2]
                margins = ((top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1.0)).tolist()
                out.append({"id": str(i), "prediction": "x", "token_ids": g.sequences[0, n:].tolist(), "margins": margins})
        return out
    check = token_check(records(lossy), records(model), *near_tie_threshold("bfloat16", "cpu", {"cpu/bfloat16": entry}, 4))
    differing = check["near_tie"] + check["real_difference"]
    assert differing >= 10 and check["real_difference"] > check["near_tie"]
