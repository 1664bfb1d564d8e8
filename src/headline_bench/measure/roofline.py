"""What the machine can do, for the bandwidth roofline: peak memory bandwidth and the bytes a decode step reads.

MBU (model bandwidth utilisation, as in ../shared/ANCHORS.md) = bytes read per decode step / TPOT / peak bandwidth,
with bytes per step = weight bytes + KV-cache bytes (every sequence of the batch reads its own cache), where a decode
step reads one row per sequence of an input embedding that is not tied to the output head, not all of it (gpt-fast
and torchao leave it out too; for Llama-3.1-8B that is 1.05 GB of 16 GB). A tied embedding is read whole by the head. On a GPU the
peak comes from the card's datasheet (the table below); on a CPU it is measured, since no table fits every socket."""

from __future__ import annotations

import re
import time
from typing import Any

import torch

# Peak HBM bandwidth (bytes/s) by card; the first pattern that matches torch.cuda.get_device_name() wins.
CARD_BANDWIDTH = [
    (r"\bH100\b.*PCIe", "H100 PCIe", 2.0e12),
    (r"\bH100\b.*NVL", "H100 NVL", 3.9e12),
    (r"\bH100\b", "H100 SXM", 3.35e12),
    (r"\bH200\b", "H200", 4.8e12),
    (r"\bB200\b", "B200", 8.0e12),
    (r"\bA100\b.*SXM.*80GB", "A100 80GB SXM", 2.039e12),
    (r"\bA100\b.*80GB", "A100 80GB PCIe", 1.935e12),
    (r"\bA100\b", "A100 40GB", 1.555e12),
    (r"\bL40S\b", "L40S", 0.864e12),
    (r"\bL4\b", "L4", 0.3e12),
    (r"\bA10G\b", "A10G", 0.6e12),
]


MBU_FORMULA = ("MBU = (weight bytes - untied input embedding + one embedding row per sequence + KV-cache bytes per step) / TPOT / "
               "peak bandwidth; KV bytes = 2 x layers x KV heads x head dim x dtype bytes x tokens in context x batch")


def card_bandwidth(name: str) -> tuple[str, float] | None:
    """(table label, bytes/s) for a CUDA device name, or None for a card not in the table."""
    for pattern, label, bandwidth in CARD_BANDWIDTH:
        if re.search(pattern, name, re.IGNORECASE):
            return label, bandwidth
    return None


def measured_read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a full read of a `mb` MB buffer (a sum), well above any CPU cache."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def peak_bandwidth(device: str) -> dict[str, Any]:
    """{peak_bandwidth_gbs, peak_bandwidth_source}: the datasheet figure on a known GPU, a measured read rate on CPU,
    None with the reason on an unknown card."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        match = card_bandwidth(name)
        if not match:
            return {"peak_bandwidth_gbs": None, "peak_bandwidth_source": f"n/a: card {name!r} not in hardware.CARD_BANDWIDTH"}
        return {"peak_bandwidth_gbs": match[1] / 1e9, "peak_bandwidth_source": f"datasheet: {match[0]}"}
    return {"peak_bandwidth_gbs": measured_read_bandwidth() / 1e9,
            "peak_bandwidth_source": f"measured: best of 5 reads of 256 MB with {torch.get_num_threads()} threads"}


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV-cache bytes one token of context holds: keys and values in every layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def embedding_read(model: Any) -> dict[str, int]:
    """Bytes of the input embedding that a decode step does not read: all of it but one row per sequence, when the
    output head has its own weights; 0 when they share storage (the head then reads every row each step).

    Returns:
        {"untied_embedding_bytes", "embedding_row_bytes"} (both 0 when the model has no plain embedding).
    """
    from headline_bench.measure.weights import _tensor_bytes

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None or weight.ndim != 2:
        return {"untied_embedding_bytes": 0, "embedding_row_bytes": 0}
    size = _tensor_bytes(weight, set())
    head_weight = getattr(head, "weight", None)
    tied = head_weight is not None and head_weight.device.type != "meta" and _shares_storage(weight, head_weight)
    return {"untied_embedding_bytes": 0 if tied else size, "embedding_row_bytes": size // weight.shape[0]}


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (quantized head): not the embedding's storage
        return a is b


def bandwidth_share(weight_bytes: float, kv_bytes_per_token: float, context_tokens: float, batch: int, tpot_s: float | None,
                    peak_gbs: float | None, untied_embedding_bytes: float = 0, embedding_row_bytes: float = 0) -> dict[str, float | None]:
    """Achieved bandwidth and its share of the peak (MBU) for one technique's decode steps.

    Args:
        weight_bytes: bytes of all weights (each decode step reads them once).
        kv_bytes_per_token: kv_bytes_per_token(); 0 when no cache is kept (each step then recomputes, and the
            weights are still the bytes every step must read at least).
        context_tokens: mean tokens in the cache during decode (prompt + half the new tokens).
        batch: sequences per step.
        tpot_s: seconds per decode step.
        peak_gbs: the machine's peak bandwidth, GB/s.
        untied_embedding_bytes, embedding_row_bytes: embedding_read(); the step reads `batch` rows of the former.
    """
    if not tpot_s or tpot_s <= 0:
        return {"achieved_bandwidth_gbs": None, "bandwidth_share": None}
    embedding = embedding_row_bytes * batch if untied_embedding_bytes else 0
    step_bytes = weight_bytes - untied_embedding_bytes + embedding + kv_bytes_per_token * context_tokens * batch
    achieved = step_bytes / tpot_s / 1e9
    return {"bytes_per_step_mb": step_bytes / 2**20, "achieved_bandwidth_gbs": achieved,
            "bandwidth_share": achieved / peak_gbs if peak_gbs else None}
