"""A technique's resolved settings, the device it runs on, and whether this machine can run it."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from headline_bench.backends import unavailable
from headline_bench.errors import InputError, Skip
from headline_bench.models.ref import model_path

DEFAULTS: dict[str, Any] = {"role": "model", "engine": "transformers", "generate": {}, "batch_size": 1, "reference": None}


GENERATE_SECTION_KEYS = ("max_new_tokens", "use_cache")  # the `generate` params that are generate() kwargs


def resolve(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The full config of one technique: defaults, then the `generate` section, then its own entry."""
    techniques = params.get("techniques") or {}
    if name not in techniques:
        raise InputError(f"unknown technique '{name}'; params.yaml defines: {', '.join(sorted(techniques))}")
    entry = copy.deepcopy(techniques[name] or {})
    unknown = set(entry) - set(DEFAULTS) - {"quantize", "prune", "compile", "speculative", "device_map", "max_memory", "parallel", "threads", "dtype", "only_on", "vllm", "decode_loop"}
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


def check_hardware(cfg: dict[str, Any], device: str) -> None:
    """Raise Skip with the reason when this machine cannot run the technique as named."""
    from headline_bench.techniques import tensor_parallel as tp

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if cfg.get("only_on") and cfg["only_on"] != kind:
        raise Skip(f"only_on: {cfg['only_on']} (a recipe for that device, e.g. a kernel layout it alone has); this run is on {kind}")
    if cfg.get("device_map") and gpus < 2:
        raise Skip(f"device_map={cfg['device_map']!r} splits layers across GPUs; this machine has {gpus} GPU(s)")
    if reason := unavailable(cfg["engine"], device):
        raise Skip(reason)
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
