"""The lossless check on 30 rows (timed rows + the quality stage's check pass), with a calibration measured on other
rows: a genuinely lossless technique (kv_cache vs the uncached baseline, bfloat16) stays "equivalent" on fresh rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from headline_bench.benchmark import check_pass, generate
from headline_bench.files import write_json, write_jsonl
from headline_bench.measure.environment import env_info
from headline_bench.quality.calibrate import calibration_entry, margin_noise
from headline_bench.quality.fidelity import calibration_key
from headline_bench.quality.score import score_technique
from headline_bench.settings import parse

WORDS = ["city", "council", "vote", "news", "river", "school", "budget", "storm", "team", "wins", "mayor", "plan", "park", "rain"]
PARAMS: dict[str, Any] = {
    "base": {"seed": 1, "model": "tiny", "target": "tiny", "dtype": "bfloat16", "device": "cpu"},
    "prompt": {"template": "headline: {summary}", "few_shot": []},
    "generate": {"max_new_tokens": 8, "use_cache": True, "batch_size": 1, "warmup_runs": 0, "max_input_tokens": 600, "check_rows": 22},
    "score": {"bootstrap_samples": 200, "confidence": 0.95, "min_rows": 30, "family": ["quant8"], "seed": 3, "near_tie_alpha": 0.01,
              "near_tie_calibration": "calibration/near_tie.json"},
    "techniques": {"baseline": {"generate": {"use_cache": False}}, "kv_cache": {"reference": "baseline"}, "quant8": {}},
}


def rows(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 6)]
        out.append({"id": f"{prefix}{i}", "summary": " ".join(words), "reference": " ".join(words[:3])})
    return out


def calibrate(models_dir: Path, params: Any) -> dict[str, Any]:
    """The calibration script's measurement on 30 rows that the check never sees (other ids, other words)."""
    from transformers import AutoModelForCausalLM

    from headline_bench.data.prompts import prompts_for
    from headline_bench.techniques.config import resolve
    from headline_bench.techniques.load import build_model

    _, tokenizer, _ = build_model(resolve(params, "baseline"), "cpu")
    model = AutoModelForCausalLM.from_pretrained(models_dir / "tiny", dtype=torch.bfloat16).eval()
    spare = rows(30, seed=99, prefix="cal")
    prompts, kept, _ = prompts_for(spare, tokenizer, params.prompt, 600)
    seqs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p.ids]), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
            seqs.append((out[0].tolist(), len(p.ids)))
    return calibration_entry(margin_noise(model, seqs, pad_id=0, batch_size=8), "tiny", 0.01, 30, 240, [r["id"] for r in kept])


def test_kv_cache_is_equivalent_on_30_fresh_rows(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = parse(copy.deepcopy(PARAMS))
    entry = calibrate(models_dir, params)
    monkeypatch.chdir(tmp_path)
    quality = rows(40, seed=1, prefix="q")  # fresh: none of them is a calibration row
    write_jsonl(Path("data/prepared/quality.jsonl"), quality)
    write_jsonl(Path("data/prepared/timed.jsonl"), quality[:8])
    key = calibration_key("tiny", env_info(), "cpu", "bfloat16")
    write_json(Path("calibration/near_tie.json"), {key: entry})
    for name in ("baseline", "kv_cache"):
        records, perf = generate(name, params, quality[:8], resume=False)
        write_jsonl(Path(f"data/generations/{name}.jsonl"), records)
        write_json(Path(f"metrics/techniques/{name}/perf.json"), perf)
        checked, facts = check_pass(name, params, Path("data/prepared/quality.jsonl"), Path("data/prepared/timed.jsonl"))
        assert [r["id"] for r in checked] == [r["id"] for r in quality[8:30]] and facts["batch_size"] == 1
        write_jsonl(Path(f"data/lossless/{name}.jsonl"), checked)
        write_jsonl(Path(f"data/quality/{name}.jsonl"), records if name == "baseline" else [])  # as the quality stage leaves them
    assert check_pass("quant8", params, Path("data/prepared/quality.jsonl"), Path("data/prepared/timed.jsonl")) == ([], {})  # a lossy one runs none
    s = score_technique("kv_cache", params)
    check = s["token_check"]
    assert check["compared"] == 30 and s["check_rows"] == 22 and s["timed_rows"] == 8
    assert check["real_difference"] == 0 and check["unclassified"] == 0, json.dumps(check["differing"])
    assert "probability 0.01" in check["rule"] and "worst row" in check["rule"]
    assert check["perturbation"]["within_noise"] is True and check["perturbation"]["rows_judged"] >= 20
