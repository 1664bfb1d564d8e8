"""Quantization: bitsandbytes LLM.int8 / NF4, torchao int8 and int4 weight-only."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from headline_bench.errors import Skip
from headline_bench.logs import log

if TYPE_CHECKING:
    from headline_bench.settings import Quantize


def quantization_config(spec: Quantize, device: str, model_dtype: str) -> dict[str, Any]:
    """from_pretrained kwargs that quantize the converted safetensors model while loading.

    Args:
        spec: method "bnb" (bits 8: LLM.int8 with `threshold`; bits 4: `quant_type` nf4|fp4,
            `compute_dtype` ("auto": model_dtype), `double_quant`) or "torchao_int8" (int8 weight-only, per-row scales).
        device: "cpu" or "cuda"; the quantized model is placed there through device_map.
        model_dtype: the technique's dtype, for compute_dtype "auto".

    Raises:
        Skip: the library is missing or cannot run on this device.
    """
    method = spec.method
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
    try:  # bnb
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise Skip(f"bitsandbytes is not installed ({e})") from None
    if device.split(":")[0] not in ("cpu", "cuda", "xpu"):
        raise Skip(f"bitsandbytes has no backend for device {device!r}")
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        # LLM.int8 casts fp32 activations to fp16 and logs that on every matmul; the fact is recorded once here.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        log.info("bnb int8: activations are cast to float16 inside each int8 matmul")
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold), **placement}
    compute = spec.compute_dtype  # 4 bits; auto: the model's dtype (fp32 compute on a bf16 GPU model wastes the kernels)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                                bnb_4bit_compute_dtype=getattr(torch, model_dtype if compute == "auto" else compute),
                                bnb_4bit_use_double_quant=spec.double_quant)
    return {"quantization_config": config, **placement}


def apply_quantize(model: nn.Module, spec: Quantize) -> nn.Module:
    """Quantization that happens after loading; the load-time methods (bnb, torchao_int8) pass through.

    torchao_int4: int4 weight-only with per-group scales on every Linear, lm_head included because at 135M
    parameters the 49k x 576 head is a third of the bytes read per token. The head is tied to the input
    embedding, so it gets its own copy first: the embedding lookup stays dense, the head matmul goes int4.
    TorchAoConfig at load time left the tied head dense, hence quantize_ here. Group size 64 because
    SmolLM2's hidden size 576 does not divide by 128. On a CUDA model the same knob picks torchao's tinygemm layout
    (bf16 activations; untested on CPU-only machines, a recorded failure if the kernel is missing).
    """
    if spec.method != "torchao_int4":
        return model
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError as e:
        raise Skip(f"torchao int4 weight-only is not available ({e})") from None
    head = model.get_output_embeddings()
    if spec.include_lm_head and head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    config = PrototypeInt4WeightOnlyConfig(group_size=spec.group_size, set_inductor_config=False)
    if next(model.parameters()).device.type == "cuda":  # the CUDA counterpart: tinygemm's tile-packed layout (gpt-fast's int4)
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=spec.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (spec.include_lm_head or m is not head))
    return model
