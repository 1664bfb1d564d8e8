"""Load a technique's model and apply its transforms (quantize, prune) in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from headline_bench.logs import log
from headline_bench.models.convert import random_model, weights_folder
from headline_bench.models.ref import model_path, model_source

if TYPE_CHECKING:
    from headline_bench.settings import Prune, Quantize
    from headline_bench.techniques.config import ResolvedTechnique


def apply_prune(model: Any, spec: Prune) -> Any:
    from headline_bench.techniques.prune import apply_prune as prune

    return prune(model, spec)


def apply_quantize(model: Any, spec: Quantize) -> Any:
    from headline_bench.techniques.quantize import apply_quantize as quantize

    return quantize(model, spec)


TRANSFORMS: dict[str, Callable[..., Any]] = {"quantize": apply_quantize, "prune": apply_prune}


def load_kwargs(cfg: ResolvedTechnique, device: str) -> dict[str, Any]:
    """from_pretrained kwargs: dtype, quantization config, device placement."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, cfg.dtype)}
    if cfg.quantize:
        from headline_bench.techniques.quantize import quantization_config

        kwargs.update(quantization_config(cfg.quantize, device, cfg.dtype))
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
        if cfg.max_memory:
            kwargs["max_memory"] = cfg.max_memory
    if cfg.parallel:
        from headline_bench.techniques import tensor_parallel as tp

        kwargs.update(tp.load_kwargs(cfg, device))
    return kwargs


def build_model(cfg: ResolvedTechnique, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the technique's model and tokenizer and apply its transforms in order.

    Returns:
        model, tokenizer and facts about the load (time, path).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(cfg.model_name)
    start = time.perf_counter()
    kwargs = load_kwargs(cfg, device)
    if model_source(cfg.model_name).get("random") and set(kwargs) == {"dtype"}:
        model = random_model(path, kwargs["dtype"])  # seeded weights built on the device: no checkpoint to write or read
    else:
        model = AutoModelForCausalLM.from_pretrained(weights_folder(path), **kwargs)  # random weights: a checkpoint in .cache/
    if not {"device_map", "distributed_config", "quantization_config"} & set(kwargs):
        model.to(device)
    model.eval()
    from headline_bench.models.memory import detach_from_checkpoint

    model = detach_from_checkpoint(model)  # else memory-mapped checkpoint pages count in every variant's RSS
    for key, transform in TRANSFORMS.items():
        if spec := getattr(cfg, key):
            log.info("applying %s %s", key, spec)
            model = transform(model, spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # decoder-only batches must pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {"path": str(path), "load_s": time.perf_counter() - start,
                              "random_weights": bool(model_source(cfg.model_name).get("random"))}
