"""Weights resident the same way for every variant: no views of the memory-mapped checkpoint left."""

from __future__ import annotations

import ctypes
import gc

import torch
from torch import nn

from headline_bench.measure.weights import is_quantized


def release_freed_memory() -> None:
    """Hand freed scratch (quantizing, pruning) back to the OS; glibc keeps it and RSS would count it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def detach_from_checkpoint(model: nn.Module) -> nn.Module:
    """Copy the CPU tensors that still view the memory-mapped checkpoint into process memory, then free scratch.

    from_pretrained maps model.safetensors, and tensors kept as loaded (embeddings, norms) stay views of that
    mapping. The pages that quantizing or pruning read (all the fp32 linears) then stay resident and count in
    RSS for as long as one view lives: +405 MB for SmolLM2-135M, enough to make a 4-bit model's peak RSS
    exceed the fp32 baseline's. Copying the kept tensors lets the mapping go. Call it for every variant,
    baseline included, so that all weights are resident the same way before timing.
    """
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and not is_quantized(t):
                t.data = t.data.clone()
    release_freed_memory()
    return model
