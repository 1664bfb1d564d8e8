"""Measure the lossless check's near-tie threshold and row cap for this model, device kind and dtype; write them to
calibration/near_tie.json.

usage: python scripts/calibrate_near_tie.py DTYPE [ROWS]    (e.g. bfloat16 30)

Reads data/prepared/quality.jsonl and params.yaml (base.model, prompt, generate.max_new_tokens and check_rows,
score.near_tie_alpha). Calibrates on ROWS quality rows that no lossless check judges: those after the timed rows and
the generate.check_rows check rows. Generates each row's greedy continuation with a KV cache, then scores the same
tokens three equivalent ways (quality/calibrate.py). The entry is keyed "<model> | <device kind> | <dtype>"
(quality/fidelity.calibration_key: the GPU's name, or the CPU's family/model and ISA flags) and replaces any earlier
one; the score stage reads it (score.near_tie_calibration). Its threshold and row cap are set so that numeric noise
alone calls a row "real" in a whole check (timed + check rows, max_new_tokens positions each) with probability
~score.near_tie_alpha.
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
from headline_bench.files import QUALITY_ROWS, TIMED_ROWS, read_jsonl
from headline_bench.measure.environment import env_info
from headline_bench.models.ref import model_path
from headline_bench.quality.calibrate import calibration_entry, margin_noise
from headline_bench.quality.fidelity import calibration_key
from headline_bench.settings import load_params

OUT = Path("calibration/near_tie.json")


def main() -> None:
    if not 2 <= len(sys.argv) <= 3:
        sys.exit("usage: python scripts/calibrate_near_tie.py DTYPE [ROWS]")
    dtype, rows = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = load_params(required=["base", "prompt", "generate", "score"])
    name, g = params.base.model, params.generate
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=getattr(torch, dtype)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_path(name))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    judged = len(read_jsonl(TIMED_ROWS)) + g.check_rows  # the rows a lossless check compares: never calibrated on
    spare = read_jsonl(QUALITY_ROWS)[judged : judged + rows]
    if len(spare) < rows:
        sys.exit(f"calibrate: {rows} rows wanted after the {judged} judged ones, the quality set has {len(spare)} (raise prepare.n)")
    prompts, kept, _ = prompts_for(spare, tok, params.prompt, g.max_input_tokens)
    sequences = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p.ids], device=device), do_sample=False, max_new_tokens=g.max_new_tokens, pad_token_id=pad)
            sequences.append((out[0].tolist(), len(p.ids)))
    entry = calibration_entry(margin_noise(model, sequences, pad), name, params.score.near_tie_alpha, judged, judged * g.max_new_tokens,
                              [r["id"] for r in kept])
    key = calibration_key(name, env_info(), device, dtype)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    print(key, json.dumps({k: v for k, v in entry.items() if k != "row_ids"}))


if __name__ == "__main__":
    main()
