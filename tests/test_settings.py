"""Typed settings end to end: each bad setting of issue 16 is one `error:` line from load_params, before any data
is read or any model loads; the library gets the schema's typed result, with every default from the schema."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT
from headline_bench.serving.run import recorded, resolve_entry
from headline_bench.settings import Params, load_params, parse
from headline_bench.techniques.config import resolve

PARAMS: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
SERVE_KEYS = "client, concurrency, max_duration_s, overload_share, quality, rates, requests, runs, search_min_gap, search_steps, slo, startup_timeout_s, timeout_s, warmup_requests"
ENTRY_KEYS = "args, binary, cb, compile, continuous_batching, dtype, enabled, engine, interrupt_requests, model, parallel, quality_request, reference, request, server, threads"


def changed(path: str | tuple[str, ...], value: Any = None, delete: bool = False) -> dict[str, Any]:
    """The repo's params with one key set (or deleted); a dotted path, or a tuple for keys that hold dots."""
    params = copy.deepcopy(PARAMS)
    *parents, last = path.split(".") if isinstance(path, str) else path
    node = params
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return params


def errors_of(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: tuple[str, ...] = ()) -> list[str]:
    """The `error:` lines load_params exits with for a params.yaml holding `text`."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        load_params(Path("params.yaml"), required)
    return str(exit_.value.code).splitlines()


BAD = [  # (change, the one error line); the list first
    (changed(("techniques", "../../x"), {}), "techniques: '../../x': names may hold only letters, digits and _ (each names output files)"),
    (changed("serve.ratez", [1]), f"serve.ratez: unknown key; allowed: {SERVE_KEYS}"),
    (changed("serving.hf_serve.continous_batching", True), f"serving.hf_serve.continous_batching: unknown key; allowed: {ENTRY_KEYS}"),
    (changed("serve.slo", delete=True), "serve.slo: missing (required)"),
    (changed("serve.rates", [-1]), "serve.rates.0 = -1: should be greater than 0"),
    (changed("generate.max_new_tokens", "24"), "generate.max_new_tokens = '24': should be a valid integer"),
    (changed("techniques.kv_cache.generate", {"max_new_tokens": "24"}), "techniques.kv_cache.generate.max_new_tokens = '24': should be a valid integer"),
    (changed("techniques.kv_cache.generate", {"max_new_tokens": -5}), "techniques.kv_cache.generate.max_new_tokens = -5: should be greater than or equal to 1"),
    (changed("generate.max_new_tokens", -5), "generate.max_new_tokens = -5: should be greater than or equal to 1"),
    (changed("serving.a/b", {"engine": "vllm"}), "serving: 'a/b': names may hold only letters, digits and _ (each names output files)"),
    (changed("serving.hf_serve.server", "llama_server"),
     "serving.hf_serve: server: not a setting of engine transformers (it takes: engine, enabled, model, reference, dtype, threads, request, quality_request, "
     "continuous_batching, compile, cb)"),
    (changed("serving.hf_serve.engine", "onnx"), "serving.hf_serve.engine = 'onnx': should be 'transformers', 'llama_cpp' or 'vllm'"),
    (changed("serving.hf_serve.reference", "nope"), "serving.hf_serve.reference: 'nope' is not one of techniques"),
    (changed("serve.concurrency", [0]), "serve.concurrency.0 = 0: should be greater than or equal to 1"),
    (changed("serve.slo.share", 0), "serve.slo.share = 0: should be greater than 0"),
    (changed("techniques.kv_cache.generate", {"temperature": "hot"}),
     "techniques.kv_cache.generate: temperature = 'hot' should be float (transformers' default is 1.0)"),
    (changed("techniques.kv_cache.generate", {"max_new_tokens": None}),
     "techniques.kv_cache.generate: max_new_tokens: null is not allowed (leave it out for transformers' default)"),
    (changed("techniques.kv_cache.generate", {"cache_implementation": "statik"}), "techniques.kv_cache.generate.cache_implementation = 'statik': should be 'static',"),
    (changed(("models", "../m"), {"path": "/x"}), "models: '../m': names may hold only letters, digits, _, . and - (each is a folder under data/models)"),
]


@pytest.mark.parametrize(("params", "line"), BAD, ids=[line.split(":")[0] + "-" + str(i) for i, (_, line) in enumerate(BAD)])
def test_each_bad_setting_is_one_error_line(params: dict[str, Any], line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = errors_of(yaml.safe_dump(params), tmp_path, monkeypatch)
    assert len(lines) == 1 and lines[0].startswith(f"error: params.yaml: {line}"), lines


def test_a_section_the_stage_needs_is_named_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {k: v for k, v in PARAMS.items() if k not in ("serve", "serving")}
    assert errors_of(yaml.safe_dump(params), tmp_path, monkeypatch, ("serve", "serving")) == [
        "error: params.yaml: serve: missing (this stage needs it)", "error: params.yaml: serving: missing (this stage needs it)"]


BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")])  # 9^9 strings once expanded


def test_a_yaml_alias_bomb_fails_fast_without_expanding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    lines = errors_of(BOMB, tmp_path, monkeypatch)
    assert time.perf_counter() - start < 2
    assert lines == ["error: params.yaml: not valid YAML (line 1: YAML anchors and aliases are not allowed (&a); write the values out)"]


def test_an_alias_in_otherwise_valid_params_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "params.yaml").read_text().replace("  kv_cache: {reference: baseline}", "  kv_cache: &kv {reference: baseline}\n  kv2: *kv")
    assert errors_of(text, tmp_path, monkeypatch) == [
        f"error: params.yaml: not valid YAML (line {text.splitlines().index('  kv_cache: &kv {reference: baseline}') + 1}: "
        "YAML anchors and aliases are not allowed (&kv); write the values out)"]


def run_stage(stage: str, text: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A stage in an empty folder (no data, no models): whatever it says comes from checking params.yaml."""
    (cwd / "params.yaml").write_text(text)
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("stage", "args", "text", "line"), [
    ("generate", ("kv_cache",), yaml.safe_dump(changed("techniques.kv_cache.generate", {"max_new_tokens": "24"})),
     "techniques.kv_cache.generate.max_new_tokens = '24': should be a valid integer"),
    ("serve", ("hf_serve",), yaml.safe_dump(changed("serve.rates", [-1])), "serve.rates.0 = -1: should be greater than 0"),
    ("serve_report", (), yaml.safe_dump(changed("serve.slo", delete=True)), "serve.slo: missing (required)"),
    ("generate", ("kv_cache",), BOMB, "not valid YAML (line 1: YAML anchors and aliases are not allowed (&a); write the values out)"),
], ids=["generate-max_new_tokens", "serve-rates", "serve_report-slo", "generate-alias-bomb"])
def test_stages_stop_before_any_model_loads(stage: str, args: tuple[str, ...], text: str, line: str, tmp_path: Path) -> None:
    out = run_stage(stage, text, tmp_path, *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert [x for x in out.stderr.splitlines() if x.startswith("error: ")] == [f"error: params.yaml: {line}"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()  # nothing read, nothing written


def test_load_params_returns_the_typed_settings() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.serve.slo.ttft_s == 2.0 and params.serving["hf_serve_cb"].cb.num_blocks == 16
    assert params.techniques["prompt_lookup"].generate.prompt_lookup_num_tokens == 10


def test_defaults_come_from_the_schema() -> None:
    """What params.yaml leaves out is the schema's default, wherever the library reads it."""
    params = parse({"base": {"model": "m"}, "generate": {"max_new_tokens": 5}, "techniques": {"spec": {"speculative": {}}, "q": {"quantize": {}}},
                    "serving": {"l": {"engine": "llama_cpp"}}, "serve": {"rates": [1], "slo": {"ttft_s": 1, "tpot_s": 0.1, "share": 0.9}}})
    assert params.score is None and parse({"score": {}}).score.bootstrap_samples == 1000
    spec = resolve(params, "spec")
    assert (spec.batch_size, spec.dtype, spec.generate.use_cache) == (1, "float32", True)
    assert spec.speculative.num_assistant_tokens == 4 and spec.speculative.num_assistant_tokens_schedule == "constant"
    q = resolve(params, "q").quantize
    assert (q.method, q.bits, q.threshold) == ("bnb", 8, 6.0)
    entry = resolve_entry(params, "l")
    assert (entry.model, entry.server, entry.interrupt_requests, entry.parallel, entry.binary) == ("m", "llama_cpp_python", True, 1, "llama-server")
    assert params.serve.requests == 10 and params.serve.overload_share == 0.5 and params.base.device == "auto"


def test_recorded_config_keeps_the_keys_params_yaml_set() -> None:
    """perf.json's "config" and serve.json's "config" have the shape they had, so `dvc metrics diff` compares like with like."""
    params = parse(PARAMS)
    assert resolve(params, "quant4").record() == {
        "role": "model", "engine": "transformers", "generate": {"max_new_tokens": 24, "use_cache": True}, "batch_size": 1, "reference": None,
        "name": "quant4", "model_name": "smollm2-135m", "dtype": "float32",
        "quantize": {"method": "bnb", "bits": 4, "quant_type": "nf4", "compute_dtype": "auto", "double_quant": False}}
    assert resolve(params, "static_compile").record()["generate"] == {"max_new_tokens": 24, "use_cache": True, "cache_implementation": "static",
                                                                      "max_cache_len": 640}
    assert recorded(resolve_entry(params, "llamacpp_server")) == {"model": "smollm2-135m", "engine": "llama_cpp", "server": "llama_cpp_python",
                                                                  "interrupt_requests": False, "request": {"repeat_penalty": 1.0}, "reference": "llamacpp",
                                                                  "enabled": False}


def test_quality_pass_batch_is_one_for_compiled_and_sequential_techniques() -> None:
    """The default params: compiled techniques keep their timed shapes (batch 1) in the quality pass, so the graphs the
    timed runs compiled are reused; eager transformers techniques batch `generate.quality_batch_size` prompts."""
    from headline_bench.benchmark import quality_batch_size

    params = load_params()
    got = {name: quality_batch_size(resolve(params, name), params) for name in ("quant4", "cpu_fast", "compiled_loop_cpu", "llamacpp", "speculative")}
    assert got == {"quant4": params.generate.quality_batch_size, "cpu_fast": 1, "compiled_loop_cpu": 1, "llamacpp": 1, "speculative": 1}


def test_a_disabled_technique_is_a_recorded_skip_naming_the_flag_that_runs_it() -> None:
    from headline_bench.errors import Skip
    from headline_bench.techniques.config import check_hardware

    params = load_params()
    assert params.techniques["cpu_fast"].enabled is False
    with pytest.raises(Skip, match=r"techniques\.cpu_fast\.enabled=true"):
        check_hardware(resolve(params, "cpu_fast"), "cpu")
    on = copy.deepcopy(PARAMS)
    on["techniques"]["cpu_fast"]["enabled"] = True
    check_hardware(resolve(parse(on), "cpu_fast"), "cpu")  # no Skip: it runs here when enabled
