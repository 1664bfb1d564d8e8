"""Near-tie calibration on a tiny random Llama: the three ways of scoring the same tokens agree within numeric noise,
and that noise is larger in bfloat16 than in float32 (so each dtype needs its own threshold); the must-say-real case:
a changed model's differing tokens are not near-ties under the calibrated threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from headline_bench.quality.calibrate import calibration_entry, margin_noise, tail_threshold
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
        assert {k: [a.size for a in v] for k, v in noise[dtype].items()} == {"batched": [8] * 10, "kv_cache": [8] * 10}  # 10 rows x 8 tokens
        assert all(np.isfinite(a).all() and (a >= 0).all() for v in noise[dtype].values() for a in v)
    fp32 = np.concatenate([a for v in noise[torch.float32].values() for a in v])
    bf16 = np.concatenate([a for v in noise[torch.bfloat16].values() for a in v])
    assert fp32.max() < 1e-4 and np.quantile(bf16, 0.99) > np.quantile(fp32, 0.99)
    entry = calibration_entry(noise[torch.bfloat16], "tiny", 0.01, 30, 240, [str(i) for i in range(10)])
    assert entry["threshold"] == tail_threshold(bf16, 0.01, 240) and entry["positions"] == 160 and entry["q0.5"] <= entry["q0.99"] <= entry["max"]
    assert entry["row_cap"] >= entry["q0.9"] and entry["rows"] == 10 and entry["alpha"] == 0.01


def test_tail_threshold_calls_noise_real_on_a_whole_check_about_alpha_of_the_time() -> None:
    """The stated promise, by simulation through the real function: calibrate on 1,200 noise values (exponential-tailed,
    like |Δ margin|), then draw a fresh 720-position check; the share of checks with any value above the threshold is
    about alpha (here <= 2 alpha), where the raw 0.999 quantile is exceeded in about half the checks."""
    rng = np.random.default_rng(0)
    over_t = over_q = 0
    trials = 400
    for _ in range(trials):
        calib = rng.exponential(0.01, 1200) * (rng.random(1200) < 0.6)  # 40% exact zeros, as in float noise
        check = rng.exponential(0.01, 720) * (rng.random(720) < 0.6)
        over_t += check.max() > tail_threshold(calib, 0.01, 720)
        over_q += check.max() > np.quantile(calib, 0.999)
    assert over_t / trials <= 0.02 and over_q / trials > 0.3


def test_a_changed_model_differs_for_real_under_the_calibrated_threshold(tiny_llama: Path) -> None:
    """The must-say-real check: a lossy change (here: weights perturbed by 20%) must not come out as mostly near-ties."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    seqs = sequences(model, n=20)
    entry = calibration_entry(margin_noise(model, seqs, pad_id=0, batch_size=4), "tiny", 0.01, 20, 160, [str(i) for i in range(20)])
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
    check = token_check(records(lossy), records(model), *near_tie_threshold("bfloat16", "k", {"k": entry}, 4))
    differing = check["near_tie"] + check["real_difference"]
    assert differing >= 10 and check["real_difference"] > check["near_tie"]
