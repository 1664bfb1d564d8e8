"""Honest accounting of the bytes a model's weights hold, quantized storage included."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def _tensor_bytes(t: Any, seen: set[tuple[int, int, str]]) -> int:
    """Bytes one tensor holds, following tensor subclasses and bitsandbytes' side tensors.

    torchao weights are wrapper subclasses: their real storage is the inner tensors that
    `__tensor_flatten__` names (qdata, scale, zero_point), recursively. bitsandbytes Int8Params carry
    CB (the int8 data itself) and SCB (per-row scales); Params4bit carries a quant_state with absmax,
    the code book and, with double quantization, a nested state. Shared storage is counted once.
    """
    if t is None:
        return 0
    if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name), seen) for name in names)
    if isinstance(t, torch.Tensor):
        key = (t.data_ptr(), t.numel() * t.element_size(), str(t.device))
        total = 0
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total = key[1]
        for side in ("CB", "SCB"):  # bitsandbytes Int8Params
            total += _tensor_bytes(getattr(t, side, None), seen)
        return total + _tensor_bytes(getattr(t, "quant_state", None), seen)
    if type(t).__name__ == "QuantState":  # bitsandbytes 4-bit: absmax, code, offset, state2
        return sum(_tensor_bytes(v, seen) for v in vars(t).values() if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState")
    return 0


def is_quantized(t: Any) -> bool:
    return t is not None and (is_traceable_wrapper_subclass(t) or hasattr(t, "SCB") or hasattr(t, "quant_state"))


def weight_breakdown(model: nn.Module) -> dict[str, Any]:
    """Where the bytes are: quantized (or 2:4-packed) linear weights versus everything else.

    Returns:
        weight_bytes, quantized_linear_bytes (their data plus scales), other_bytes (embeddings,
        norms, unquantized layers such as lm_head, buffers), quantized_modules, and other_largest
        (the three biggest other tensors by name: in a small model the embedding often dominates).
    """
    seen: set[tuple[int, int, str]] = set()
    quantized = other = count = 0
    others: list[tuple[int, str]] = []
    for mod_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in tensors:
            n = _tensor_bytes(t, seen)
            if is_quantized(t):
                quantized += n
                count += 1
            else:
                other += n
                others.append((n, f"{mod_name}.{name}"))
    top = {name: n for n, name in sorted(others, reverse=True)[:3] if n}
    return {"weight_bytes": quantized + other, "quantized_linear_bytes": quantized, "other_bytes": other,
            "quantized_modules": count, "other_largest": top}


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, quantized storage and scales included, shared tensors once."""
    return weight_breakdown(model)["weight_bytes"]
