"""Techniques: each is data in params.yaml (`techniques.<name>`) plus the few lines here that apply it.

A resolved technique is a dict with these keys (defaults in DEFAULTS):
  role       "model" (small) or "target" (large): which model of `base` it runs.
  backend    "hf" (transformers), "llamacpp", "vllm".
  generate   generate() kwargs over the `generate` section (use_cache, prompt_lookup_num_tokens, ...).
  batch_size prompts per generate call.
  reference  for lossless techniques: the technique whose predictions this one must equal (None: lossy).
  quantize   from_pretrained quantization (compress.quantization_config).
  prune      a model transform (TRANSFORMS), applied after loading.
  compile    torch.compile of generate's decode step (transformers' CompileConfig), with a static cache.
  speculative  assisted generation kwargs; the draft is base.model.
  device_map / max_memory / parallel: layer split across GPUs / tensor parallel (tp.py, tp_size "auto" allowed).
  only_on    "cpu" or "cuda": a recipe for one device kind (a recorded skip on the other).
  vllm       vLLM engine arguments (gpu_memory_utilization, ...).
Settings compose: quantize + prune + kv cache + compile in one entry.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import MODELS, InputError, Skip, log

DEFAULTS: dict[str, Any] = {"role": "model", "backend": "hf", "generate": {}, "batch_size": 1, "reference": None}
GENERATE_SECTION_KEYS = ("max_new_tokens", "use_cache")  # the `generate` params that are generate() kwargs


def resolve(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The full config of one technique: defaults, then the `generate` section, then its own entry."""
    techniques = params.get("techniques") or {}
    if name not in techniques:
        raise InputError(f"unknown technique '{name}'; params.yaml defines: {', '.join(sorted(techniques))}")
    entry = copy.deepcopy(techniques[name] or {})
    unknown = set(entry) - set(DEFAULTS) - {"quantize", "prune", "compile", "speculative", "device_map", "max_memory", "parallel", "threads", "dtype", "only_on", "vllm"}
    if unknown:
        raise InputError(f"technique '{name}': unknown setting(s) {sorted(unknown)}")
    section = params["generate"]
    cfg = {**copy.deepcopy(DEFAULTS), "batch_size": section.get("batch_size", 1), **entry}
    cfg["generate"] = {**{k: section[k] for k in GENERATE_SECTION_KEYS if k in section}, **entry.get("generate", {})}
    cfg["name"] = name
    cfg["model_name"] = params["base"][cfg["role"]]
    cfg["dtype"] = entry.get("dtype", params["base"].get("dtype", "float32"))
    return cfg


def pick_device(setting: str = "auto") -> str:
    """`auto`: CUDA when there is a GPU, else the CPU. A named CUDA device that is not there is an error, never a
    silent CPU run (an 8B model on a CPU takes hours)."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        index = int(setting.split(":")[1]) if ":" in setting else 0
        if not torch.cuda.is_available():
            raise InputError(f"base.device is '{setting}' but torch sees no CUDA GPU (torch {torch.__version__}; is it the CPU build?)")
        if index >= torch.cuda.device_count():
            raise InputError(f"base.device is '{setting}' but only {torch.cuda.device_count()} GPU(s) are visible")
    elif setting != "cpu":
        raise InputError(f"base.device must be auto, cpu, cuda or cuda:N, got '{setting}'")
    return setting


def model_path(name: str) -> Path:
    """The folder a model loads from: its converted copy in data/models, or the pinned hub snapshot in the hub cache."""
    path = MODELS / name
    if (path / "config.json").exists():
        return path
    source = path / "source.json"
    if source.exists():
        info = json.loads(source.read_text())
        if info.get("revision") and "id" in info and not info.get("random"):
            from huggingface_hub import snapshot_download

            from models import HUB_FILES

            try:  # the pinned commit is already in the hub cache: no network
                return Path(snapshot_download(info["id"], revision=info["revision"], allow_patterns=HUB_FILES, local_files_only=True))
            except Exception:
                return Path(snapshot_download(info["id"], revision=info["revision"], allow_patterns=HUB_FILES))
    raise InputError(f"{path}: model not converted; run `dvc repro models`")


def model_source(name: str) -> dict[str, Any]:
    """data/models/<name>/source.json: where the weights came from (hub commit, GGUF sha256, random seed)."""
    path = MODELS / name / "source.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_hardware(cfg: dict[str, Any], device: str) -> None:
    """Raise Skip with the reason when this machine cannot run the technique as named."""
    import tp

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if cfg.get("only_on") and cfg["only_on"] != kind:
        raise Skip(f"only_on: {cfg['only_on']} (a recipe for that device, e.g. a kernel layout it alone has); this run is on {kind}")
    if cfg.get("device_map") and gpus < 2:
        raise Skip(f"device_map={cfg['device_map']!r} splits layers across GPUs; this machine has {gpus} GPU(s)")
    if cfg["backend"] == "vllm" and not gpus:
        raise Skip("vLLM needs a CUDA GPU; this machine has none")
    if not cfg.get("parallel"):
        return
    size = tp.tp_size(cfg)
    config = json.loads((model_path(cfg["model_name"]) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = {k: config[k] for k in ("num_attention_heads", "num_key_value_heads") if config.get(k)}
    if size < 2:  # tensor parallel shards attention heads over ranks: it needs two and both head counts divisible
        raise Skip(f"tensor parallel: no tp_size >= 2 divides {cfg['model_name']}'s heads {heads} within this machine's {gpus} GPU(s)")
    for key, n in heads.items():
        if n % size:
            raise Skip(f"tensor parallel: {cfg['model_name']} has {key}={n}, which tp_size={size} does not divide")


def apply_prune(model: Any, **spec: Any) -> Any:
    from compress import apply_prune as prune  # lazy: keeps this module light

    return prune(model, **spec)


def apply_quantize(model: Any, **spec: Any) -> Any:
    from compress import apply_quantize as quantize  # post-load methods only; bnb/torchao_int8 quantize at load

    return quantize(model, **spec)


TRANSFORMS: dict[str, Callable[..., Any]] = {"quantize": apply_quantize, "prune": apply_prune}


def load_kwargs(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """from_pretrained kwargs: dtype, quantization config, device placement."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, cfg["dtype"])}
    if cfg.get("quantize"):
        from compress import quantization_config

        kwargs.update(quantization_config(cfg["quantize"], device, cfg["dtype"]))
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg["device_map"]
        if cfg.get("max_memory"):
            kwargs["max_memory"] = cfg["max_memory"]
    if cfg.get("parallel"):
        import tp  # starts the process group inside a torchrun rank

        kwargs.update(tp.load_kwargs(cfg, device))
    return kwargs


def build_model(cfg: dict[str, Any], device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the technique's model and tokenizer and apply its transforms in order.

    Returns:
        model, tokenizer and facts about the load (time, path).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(cfg["model_name"])
    start = time.perf_counter()
    kwargs = load_kwargs(cfg, device)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not {"device_map", "distributed_config", "quantization_config"} & set(kwargs):
        model.to(device)
    model.eval()
    from compress import detach_from_checkpoint

    model = detach_from_checkpoint(model)  # else memory-mapped checkpoint pages count in every variant's RSS
    for key, transform in TRANSFORMS.items():
        if cfg.get(key):
            log.info("applying %s %s", key, cfg[key])
            model = transform(model, **cfg[key])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # decoder-only batches must pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {"path": str(path), "load_s": time.perf_counter() - start,
                              "random_weights": bool(model_source(cfg["model_name"]).get("random"))}
