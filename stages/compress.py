"""Compression techniques: pruning and quantization, and honest accounting of the bytes they hold.

Pruning keeps dense storage: zeros are still stored and multiplied (pytorch#36214), so only 2:4 sparsity
with the semi-structured kernels (CUDA sm80+, fp16/bf16) can change memory or speed. Quantized weights are
counted from what they really hold (int8/uint8 data plus scales, absmax and lookup tables), because
`get_memory_footprint()` misses bitsandbytes' quant_state and counts torchao's int8 weights as float32.

The output embedding (lm_head) is not pruned by default: in tied models it is the input embedding, so
pruning it would zero token embeddings too. This matches what the quantizers do (they skip it as well).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from common import InputError, Skip, log

QUANTIZE_KEYS = {"method", "bits", "quant_type", "compute_dtype", "double_quant", "threshold", "group_size", "include_lm_head"}


# ---------------------------------------------------------------------------------------------- bytes

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


def _is_quantized(t: Any) -> bool:
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
            if _is_quantized(t):
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


# ------------------------------------------------------------------------------------------- memory

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
            if t.device.type == "cpu" and not _is_quantized(t):
                t.data = t.data.clone()
    release_freed_memory()
    return model


# -------------------------------------------------------------------------------------------- pruning

def prunable(model: nn.Module, include_lm_head: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers that pruning touches: all but the output embedding unless asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (include_lm_head or module is not head):
            yield name, module


def sparsity(model: nn.Module, include_lm_head: bool = False) -> dict[str, Any]:
    """Share of exactly-zero weights, per prunable dense Linear layer and over all of them.

    Returns:
        sparsity_overall (zeros / weights over the prunable layers), sparsity_per_layer {name: share},
        sparsity_all_params (zeros / every parameter of the model, embeddings and norms included: what a
        sparse format could save on the whole model), sparsity_layers (which layers the first covers).
    """
    dense = [p for p in model.parameters() if not _is_quantized(p)]
    all_zeros, all_total = sum(int((p == 0).sum()) for p in dense), sum(p.numel() for p in dense)
    zeros = total = 0
    per_layer = {}
    for name, module in prunable(model, include_lm_head):
        w = module.weight
        if _is_quantized(w):  # packed storage (quantized, 2:4 semi-structured): measure before packing
            continue
        z = int((w == 0).sum())
        zeros, total = zeros + z, total + w.numel()
        per_layer[name] = round(z / w.numel(), 6)
    return {"sparsity_overall": zeros / total if total else 0.0, "sparsity_per_layer": per_layer,
            "sparsity_all_params": all_zeros / all_total if all_total else 0.0,
            "sparsity_layers": f"{len(per_layer)} Linear layers" + ("" if include_lm_head else " (lm_head excluded)")}


def mask_2of4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes in every group of 4 consecutive input weights.

    Args:
        weight: [out, in], in divisible by 4.
    """
    out_f, in_f = weight.shape
    if in_f % 4:
        raise InputError(f"2:4 sparsity needs in_features divisible by 4, got {in_f}")
    groups = weight.detach().abs().reshape(out_f, in_f // 4, 4)  # [out, in/4, 4]
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def sparse_kernel_support(model: nn.Module) -> str | None:
    """None if the 2:4 semi-structured kernels can run on this model, else the reason they cannot."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return f"model is on {p.device.type}; semi-structured sparse kernels need a CUDA GPU with compute capability >= 8.0"
    major, minor = torch.cuda.get_device_capability(p.device)
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (sm80+ needed for 2:4 sparse tensor cores)"
    if p.dtype not in (torch.float16, torch.bfloat16):
        return f"model dtype {str(p.dtype).replace('torch.', '')}; the 2:4 kernels take float16/bfloat16 (set the technique's dtype)"
    return None


def to_semi_structured(layers: list[tuple[str, nn.Linear]]) -> str:
    """Swap 2:4-pruned Linear weights for torch's semi-structured sparse tensors where the shape allows."""
    from torch.sparse import to_sparse_semi_structured

    done, refused = 0, {}
    for name, module in layers:
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            done += 1
        except RuntimeError as e:  # shape not a multiple of the kernel's tile
            refused[name] = str(e).splitlines()[0][:160]
    if refused:
        log.warning("2:4 kernels refused %d layer(s), they stay dense: %s", len(refused), next(iter(refused.values())))
    return f"applied to {done}/{len(layers)} linear layers" + (f"; dense: {sorted(refused)}" if refused else "")


def apply_prune(model: nn.Module, method: str = "l1_unstructured", amount: float = 0.3, include_lm_head: bool = False,
                kernels: bool = True) -> nn.Module:
    """Prune the Linear weights permanently (no masks or hooks left) and attach the facts to the model.

    Args:
        model: a dense (unquantized) model.
        method: "l1_unstructured" (global L1 magnitude over all pruned layers, `amount` of their
            weights) or "2of4" (2 of every 4 input weights per row; `amount` is fixed at 0.5).
        amount: share of weights to zero for l1_unstructured.
        include_lm_head: also prune the output embedding (in tied models this prunes the input embedding too).
        kernels: for 2of4, use the semi-structured sparse kernels where the hardware allows.

    Sets `model.compression_facts`: sparsity_overall, sparsity_per_layer, pruned_layers, prune_s, prune_peak_rss_mb,
    sparse_kernels.
    """
    layers = list(prunable(model, include_lm_head))
    if any(_is_quantized(m.weight) for _, m in layers):
        raise Skip("pruning a quantized model is not supported here: its weights are packed integers")
    if method not in ("l1_unstructured", "2of4"):
        raise InputError(f"prune.method must be l1_unstructured or 2of4, got {method!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if include_lm_head and tied:
        log.warning("lm_head is tied to the input embedding: pruning it prunes the embedding too")
    start = time.perf_counter()
    if method == "l1_unstructured":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount)
        for _, m in layers:
            prune.remove(m, "weight")  # permanent: weight = weight_orig * mask, hooks and masks gone
    else:
        with torch.no_grad():  # one layer at a time: a mask of one layer alive at once, not weight_orig + mask of all (3x for 8B)
            for _, m in layers:
                m.weight.mul_(mask_2of4(m.weight))
    facts: dict[str, Any] = {"prune_method": method, "pruned_layers": len(layers), **sparsity(model, include_lm_head),
                             "lm_head_pruned": include_lm_head, "lm_head_tied": tied}
    if method == "2of4":
        reason = None if kernels else "disabled (prune.kernels: false)"
        reason = reason or sparse_kernel_support(model)
        facts["sparse_kernels"] = f"skipped: {reason}" if reason else to_semi_structured(layers)
    else:
        facts["sparse_kernels"] = "none: unstructured zeros stay in dense storage and dense matmuls (pytorch#36214)"
    facts["prune_s"] = time.perf_counter() - start
    # process peak so far (Linux: KiB): global L1 holds all scores, masks and the topk at once
    facts["prune_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    detach_from_checkpoint(model)
    log.info("pruned %d layers (%s): %.1f%% zeros; sparse kernels: %s", len(layers), method, 100 * facts["sparsity_overall"], facts["sparse_kernels"])
    model.compression_facts = {**getattr(model, "compression_facts", {}), **facts}
    return model


# --------------------------------------------------------------------------------------- quantization

def quantization_config(spec: dict[str, Any], device: str, model_dtype: str = "float32") -> dict[str, Any]:
    """from_pretrained kwargs that quantize the converted safetensors model while loading.

    Args:
        spec: method "bnb" (bits 8: LLM.int8 with `threshold`; bits 4: `quant_type` nf4|fp4,
            `compute_dtype` ("auto": model_dtype), `double_quant`) or "torchao_int8" (int8 weight-only, per-row scales).
        device: "cpu" or "cuda"; the quantized model is placed there through device_map.
        model_dtype: the technique's dtype, for compute_dtype "auto".

    Raises:
        Skip: the library is missing or cannot run on this device.
    """
    unknown = set(spec) - QUANTIZE_KEYS
    if unknown:
        raise InputError(f"quantize: unknown setting(s) {sorted(unknown)}; known: {sorted(QUANTIZE_KEYS)}")
    method = spec.get("method", "bnb")
    if method == "torchao_int4":
        return {}  # applied after loading: apply_quantize
    placement = {"device_map": {"": device}}
    if method == "torchao_int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError as e:
            raise Skip(f"torchao is not installed ({e})") from None
        from transformers import TorchAoConfig

        return {"quantization_config": TorchAoConfig(quant_type=Int8WeightOnlyConfig()), **placement}
    if method != "bnb":
        raise InputError(f"quantize.method must be bnb, torchao_int8 or torchao_int4, got {method!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise Skip(f"bitsandbytes is not installed ({e})") from None
    if device.split(":")[0] not in ("cpu", "cuda", "xpu"):
        raise Skip(f"bitsandbytes has no backend for device {device!r}")
    from transformers import BitsAndBytesConfig

    bits = spec.get("bits", 8)
    if bits == 8:
        # LLM.int8 casts fp32 activations to fp16 and logs that on every matmul; the fact is recorded once here.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        log.info("bnb int8: activations are cast to float16 inside each int8 matmul")
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.get("threshold", 6.0)), **placement}
    if bits == 4:
        compute = spec.get("compute_dtype", "auto")  # auto: the model's dtype (fp32 compute on a bf16 GPU model wastes the kernels)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.get("quant_type", "nf4"),
                                    bnb_4bit_compute_dtype=getattr(torch, model_dtype if compute == "auto" else compute),
                                    bnb_4bit_use_double_quant=bool(spec.get("double_quant", False)))
        return {"quantization_config": config, **placement}
    raise InputError(f"quantize.bits must be 8 or 4 for bnb, got {bits!r}")


def apply_quantize(model: nn.Module, method: str = "bnb", group_size: int = 64, include_lm_head: bool = True, **_: Any) -> nn.Module:
    """Quantization that happens after loading; the load-time methods (bnb, torchao_int8) pass through.

    torchao_int4: int4 weight-only with per-group scales on every Linear, lm_head included because at 135M
    parameters the 49k x 576 head is a third of the bytes read per token. The head is tied to the input
    embedding, so it gets its own copy first: the embedding lookup stays dense, the head matmul goes int4.
    TorchAoConfig at load time left the tied head dense, hence quantize_ here. Group size 64 because
    SmolLM2's hidden size 576 does not divide by 128.
    """
    if method != "torchao_int4":
        return model
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError as e:
        raise Skip(f"torchao int4 weight-only is not available ({e})") from None
    head = model.get_output_embeddings()
    if include_lm_head and head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (include_lm_head or m is not head))
    return model
