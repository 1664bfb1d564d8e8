"""params.yaml is checked against one schema before any stage works: one line per problem, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT
from headline_bench.settings import check

PARAMS: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    *parents, last = path.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[last] = value
    return params


def test_repo_params_are_valid() -> None:
    assert check(PARAMS) == []


def test_team_keys_are_accepted() -> None:
    """Keys other work adds (the shared contract): the schema must take them."""
    params = copy.deepcopy(PARAMS)
    params["base"]["device"] = "cuda:1"
    params["generate"]["repeats"] = 3
    params["score"].update(margin=0.01, seed=3)
    params["report"]["usd_per_hour"] = None
    params["prepare"].update(encoding="latin-1", dedupe=True, header="none", summary_column=1, headline_column=0, id_column=None)
    params["models"]["random"] = {"config": "stages/configs/x.json", "tokenizer_from": "smollm2-135m", "seed": 1}
    params["models"]["pinned"] = {"hub_id": "org/model", "revision": "abc123"}
    params["models"]["local"] = {"path": "/models/x"}
    params["techniques"]["spec2"] = {"role": "target", "speculative": {"num_assistant_tokens": 5, "assistant_confidence_threshold": 0.4}}
    params["techniques"]["tp_auto"] = {"parallel": {"tp_size": "auto"}, "device_map": "auto", "max_memory": {0: "10GiB", "cpu": "30GiB"}}
    params["techniques"]["empty"] = None
    params["serve"] = {"rates": [1], "slo": {"ttft_s": 1, "tpot_s": 0.05, "share": 0.9}}  # the rest from the schema's defaults
    params["serving"] = {"engine": {"engine": "vllm", "args": ["--max-num-seqs", 8]}, "cb": {"engine": "transformers", "cb": {"use_cuda_graph": True}}}
    params["techniques"]["gen"] = {"generate": {"num_beams": 2, "temperature": 0.7, "top_k": 5, "stop_strings": ["\n"]}}
    assert check(params) == []


@pytest.mark.parametrize(("path", "value", "line"), [
    ("prepare.n", -5, "prepare.n = -5: should be greater than or equal to 1"),
    ("prepare.n", 0, "prepare.n = 0: should be greater than or equal to 1"),
    ("prepare.n", "abc", "prepare.n = 'abc': should be a valid integer"),
    ("prepare.shuffle", "yes", "prepare.shuffle = 'yes': should be a valid boolean"),
    ("prepare.encoding", "utf-9", "prepare.encoding = 'utf-9': unknown encoding 'utf-9'"),
    ("prepare.header", "no", "prepare.header = 'no': should be 'first_row' or 'none'"),
    ("base.dtype", "fp8", "base.dtype = 'fp8': should be 'float32', 'float16' or 'bfloat16'"),
    ("base.device", "gpu", "base.device = 'gpu': String should match pattern"),
    ("generate.batch_size", 0, "generate.batch_size = 0: should be greater than or equal to 1"),
    ("score.confidence", 1.5, "score.confidence = 1.5: should be less than 1"),
    ("techniques.quant4.quantize.bits", 3, "techniques.quant4.quantize.bits = 3: should be 4 or 8"),
    ("techniques.prune_l1.prune.amount", 2, "techniques.prune_l1.prune.amount = 2: should be less than or equal to 1"),
    ("techniques.tensor_parallel.parallel.tp_size", "x", "techniques.tensor_parallel.parallel.tp_size = 'x': should be a valid integer or 'auto'"),
    ("technique", "quant3", "technique: 'quant3' is not one of techniques"),
    ("techniques.kv_cache.reference", "nope", "techniques.kv_cache.reference: 'nope' is not one of techniques"),
    ("base.model", "nope", "base.model: 'nope' is not defined under models"),
    ("prompt.template", "no field", "prompt.template = 'no field': must contain {summary}"),
])
def test_each_problem_is_one_line_naming_key_and_allowed(path: str, value: Any, line: str) -> None:
    problems = check(with_change(path, value))
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_unknown_keys_are_rejected_with_the_allowed_ones() -> None:
    params = copy.deepcopy(PARAMS)
    params["prepare"]["sumary_column"] = "x"
    params["techniques"]["quant4"]["quantize"]["bitz"] = 4
    params["techniques"]["kv_cache"] = {"refrence": "baseline"}
    params["scores"] = {}
    problems = check(params)
    assert "prepare.sumary_column: unknown key; allowed: dedupe, encoding, header, headline_column, id_column, n, shuffle, source, split, summary_column, timed_rows" in problems
    assert any(p.startswith("techniques.quant4.quantize.bitz: unknown key; allowed: bits,") for p in problems)
    assert any(p.startswith("techniques.kv_cache.refrence: unknown key; allowed: batch_size, compile,") for p in problems)
    assert any(p.startswith("scores: unknown key; allowed: base,") for p in problems)
    assert len(problems) == 4


def test_generate_kwarg_typo_suggests_the_close_match() -> None:
    problems = check(with_change("techniques.kv_cache", {"generate": {"num_beamz": 2}}))
    assert problems == ["techniques.kv_cache.generate: unknown generate() argument 'num_beamz' (did you mean 'num_beams'?)"]
    assert check(with_change("techniques.kv_cache", {"generate": {"max_cache_len": 64, "prompt_lookup_num_tokens": 3}})) == []


def test_model_entries_need_exactly_one_source() -> None:
    problems = check(with_change("models.x", {"hub_id": "a/b", "path": "/x"}))
    assert problems == ["models.x: give exactly one of gguf_package, hub_id, path, config (got ['hub_id', 'path'])"]
    assert check(with_change("models.smollm2-135m.sha256", "abc"))[0].startswith("models.smollm2-135m.sha256 = 'abc'")


def test_column_positions_need_header_none() -> None:
    problems = check(with_change("prepare.summary_column", 1))
    assert problems == ["prepare: summary_column is a position (1); positions need prepare.header: none"]


def run_stage(stage: str, params: dict[str, Any], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("stage", "args"), [("prepare", ()), ("models", ()), ("generate", ("kv_cache",)), ("score", ("kv_cache",)), ("report", ())])
def test_every_stage_stops_on_bad_params_without_a_traceback(stage: str, args: tuple[str, ...], tmp_path: Path) -> None:
    """Checked before any data is read or any model loads: `num_beamz` never reaches transformers."""
    params = with_change("techniques.kv_cache", {"generate": {"num_beamz": 2}})
    params["prepare"]["n"] = "abc"
    out = run_stage(stage, params, tmp_path, *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: params.yaml: prepare.n = 'abc': should be a valid integer",
                      "error: params.yaml: techniques.kv_cache.generate: unknown generate() argument 'num_beamz' (did you mean 'num_beams'?)"]


def test_unknown_technique_on_the_command_line(tmp_path: Path) -> None:
    out = run_stage("generate", PARAMS, tmp_path, "quant3")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown technique 'quant3'; params.yaml defines: baseline,")
