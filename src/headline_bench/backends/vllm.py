"""The vLLM engine (CUDA only): offline LLM.generate and `vllm serve`."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from headline_bench.backends.base import GenerateFn, Generation, ServerSpec, missing
from headline_bench.errors import Skip
from headline_bench.models.ref import model_path

if TYPE_CHECKING:
    from headline_bench.settings import Params, ServingEntry
    from headline_bench.techniques.config import ResolvedTechnique


def unavailable(device: str) -> str | None:
    """Why vLLM cannot run on `device`, or None: it needs a CUDA GPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return None
    return "vLLM needs a CUDA GPU; this machine has none"


def setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """vLLM on the converted checkpoint; one llm.generate call per batch, like hf_generate.

    Measured so that it compares with the in-process backends: prefix caching off (every row shares the chat
    prefix, and the warm-up prompt is the first timed row); memory from NVML, since the engine core runs in its
    own process and torch's counters here read ~0; TTFT as the latency of the same batch with max_tokens=1 (the
    offline LLM API does not stream, and V1 leaves RequestOutput.metrics empty); gpu_memory_utilization and
    max_model_len set explicitly from the technique's `vllm` settings.
    """
    import torch

    if reason := unavailable(device):
        raise Skip(reason)
    try:
        import vllm
    except ImportError:
        raise Skip("vllm not installed: pip install vllm in its own virtual environment (it pins its own torch; docs/gpu.md)") from None
    from transformers import AutoTokenizer

    from headline_bench.data.prompts import clean_headline
    from headline_bench.models.convert import weights_folder
    from headline_bench.models.ref import model_source
    from headline_bench.settings import Vllm

    path = model_path(cfg.model_name)
    weights = weights_folder(path)  # a random-weight model's checkpoint, written once in .cache/ (never into data/models)
    max_new = cfg.generate.max_new_tokens
    settings = (cfg.vllm or Vllm()).model_dump()
    settings["max_model_len"] = settings["max_model_len"] or params.generate.max_input_tokens + max_new
    start = time.perf_counter()
    llm = vllm.LLM(model=str(weights), dtype=cfg.dtype, seed=params.base.seed, tensor_parallel_size=cfg.tp_size, enable_prefix_caching=False, **settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    random = bool(model_source(cfg.model_name).get("random"))
    fixed = {"ignore_eos": True, "min_tokens": max_new} if random else {"stop": ["\n"], "include_stop_str_in_output": True}
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=max_new, **fixed)
    first = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    info = {"path": str(path), "load_s": time.perf_counter() - start, "engine": f"vllm {vllm.__version__}", "dtype": cfg.dtype,
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


def server(entry: ServingEntry, params: Params, port: int, device: str, host: str) -> ServerSpec:
    """`vllm serve` on the converted checkpoint (CUDA only)."""
    if reason := unavailable(device):
        raise Skip(reason)
    model = model_path(entry.model)
    dtype, seed = entry.dtype or params.base.dtype, params.base.seed
    if missing("vllm"):
        raise Skip("vllm not installed: pip install vllm (CUDA only)")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host, "--port", str(port),
            "--dtype", dtype, "--seed", str(seed), *(str(a) for a in entry.args)]
    # vLLM's /v1/completions takes a list of token ids as the prompt: the offline (transformers) ids are sent as they are
    return ServerSpec(argv, "/health", str(model), entry.threads or 1, {"model_path": str(model), "dtype": dtype}, token_prompts=True)
