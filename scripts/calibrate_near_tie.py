"""Measure the near-tie threshold of the lossless check for this device and a dtype; write it to calibration/near_tie.json.

usage: python scripts/calibrate_near_tie.py DTYPE [ROWS] [QUANTILE]    (e.g. bfloat16 30 0.999)

Reads data/prepared/timed.jsonl and params.yaml (base.model, prompt, generate.max_new_tokens), generates each row's
greedy continuation with a KV cache, then scores the same tokens three equivalent ways (quality/calibrate.py). The
entry is keyed "<device type>/<dtype>" and replaces any earlier one; the score stage reads it (score.near_tie_calibration).
Why 0.999 by default: a 30-row check compares ~600 positions, so with the 0.99 quantile about six positions per check
carry noise above the threshold and a flip there reads as "real" (seen: kv_cache in bf16, one row at margin 0.071
against a 0.99 quantile of 0.030, inside the KV-cache way's own noise, max 0.119). What tells a lossy technique from
numerics is its perturbation of the margins (score.near_tie_perturbation x the entry's q0.9), not this threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import _workspace  # noqa: E402, F401  (headline_bench from this workspace's src/)

# isort: split
from headline_bench.data.prompts import prompts_for
from headline_bench.files import TIMED_ROWS, read_jsonl
from headline_bench.models.ref import model_path
from headline_bench.quality.calibrate import calibration_entry, margin_noise
from headline_bench.settings import load_params

OUT = Path("calibration/near_tie.json")


def main() -> None:
    if not 2 <= len(sys.argv) <= 4:
        sys.exit("usage: python scripts/calibrate_near_tie.py DTYPE [ROWS] [QUANTILE]")
    dtype, rows, quantile = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30, float(sys.argv[3]) if len(sys.argv) > 3 else 0.999
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = load_params(required=["base", "prompt", "generate"])
    name = params.base.model
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=getattr(torch, dtype)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_path(name))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts, _, _ = prompts_for(read_jsonl(TIMED_ROWS)[:rows], tok, params.prompt, params.generate.max_input_tokens)
    sequences = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p.ids], device=device), do_sample=False, max_new_tokens=params.generate.max_new_tokens, pad_token_id=pad)
            sequences.append((out[0].tolist(), len(p.ids)))
    entry = calibration_entry(margin_noise(model, sequences, pad), quantile, name, len(sequences))
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[f"{device}/{dtype}"] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
