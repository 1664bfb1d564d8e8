"""Pruning: global L1 magnitude and 2:4 semi-structured."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from headline_bench.errors import InputError, Skip
from headline_bench.logs import log
from headline_bench.measure.weights import is_quantized
from headline_bench.models.memory import detach_from_checkpoint

if TYPE_CHECKING:
    from headline_bench.settings import Prune


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
    dense = [p for p in model.parameters() if not is_quantized(p)]
    all_zeros, all_total = sum(int((p == 0).sum()) for p in dense), sum(p.numel() for p in dense)
    zeros = total = 0
    per_layer = {}
    for name, module in prunable(model, include_lm_head):
        w = module.weight
        if is_quantized(w):  # packed storage (quantized, 2:4 semi-structured): measure before packing
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


def global_l1(layers: list[tuple[str, nn.Linear]], amount: float) -> int:
    """Zero the `amount` share of the smallest-magnitude weights over all layers together, in place; returns how many.

    torch.nn.utils.prune.global_unstructured with L1Unstructured does the same (round(amount x n) weights, the smallest
    |w| over every layer) through a topk over all scores with full-size masks and weight_orig copies: 16.6 s and a
    5.4 GB peak for SmolLM2-135M's 106M weights on a 2-core Intel, once per timed process. Here one kthvalue finds the
    threshold and each layer is masked where it lies: the whole
    call 4.8 s and a 2.4 GB process peak on the same machine (docs/techniques.md). Weights equal to the threshold (GGUF-dequantized
    weights repeat exact values) are pruned in layer and index order until the count is reached; topk takes them in no
    stated order, so the two agree exactly where there are no such ties (tests/test_compress.py).
    """
    weights = [m.weight for _, m in layers]
    k = round(amount * sum(w.numel() for w in weights))  # prune._compute_nparams_toprune for a float amount
    if k == 0:
        return 0
    with torch.no_grad():
        scores = torch.cat([w.detach().abs().flatten() for w in weights])
        threshold = scores.kthvalue(k).values
        ties = k - int((scores < threshold).sum())  # weights equal to the threshold still to prune
        del scores
        for w in weights:
            magnitude = w.abs()
            drop = magnitude < threshold
            if ties > 0:
                equal = (magnitude == threshold).flatten().nonzero().squeeze(1)[:ties]
                drop.view(-1)[equal] = True
                ties -= len(equal)
            w.masked_fill_(drop, 0.0)
    return k


def apply_prune(model: nn.Module, spec: Prune) -> nn.Module:
    """Prune the Linear weights permanently (no masks or hooks left) and attach the facts to the model.

    Args:
        model: a dense (unquantized) model.
        spec: `method` "l1_unstructured" (global L1 magnitude over all pruned layers, `amount` of their
            weights) or "2of4" (2 of every 4 input weights per row; `amount` is fixed at 0.5);
            `include_lm_head`: also prune the output embedding (in tied models this prunes the input
            embedding too); `kernels`: for 2of4, use the semi-structured sparse kernels where the hardware allows.

    Sets `model.compression_facts`: sparsity_overall, sparsity_per_layer, pruned_layers, prune_s, prune_peak_rss_mb,
    sparse_kernels.
    """
    method, include_lm_head = spec.method, spec.include_lm_head
    layers = list(prunable(model, include_lm_head))
    if any(is_quantized(m.weight) for _, m in layers):
        raise Skip("pruning a quantized model is not supported here: its weights are packed integers")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if include_lm_head and tied:
        log.warning("lm_head is tied to the input embedding: pruning it prunes the embedding too")
    start = time.perf_counter()
    if method == "l1_unstructured":
        global_l1(layers, spec.amount)
    else:
        with torch.no_grad():  # one layer at a time: a mask of one layer alive at once, not weight_orig + mask of all (3x for 8B)
            for _, m in layers:
                m.weight.mul_(mask_2of4(m.weight))
    facts: dict[str, Any] = {"prune_method": method, "pruned_layers": len(layers), **sparsity(model, include_lm_head),
                             "lm_head_pruned": include_lm_head, "lm_head_tied": tied}
    if method == "2of4":
        reason = None if spec.kernels else "disabled (prune.kernels: false)"
        reason = reason or sparse_kernel_support(model)
        facts["sparse_kernels"] = f"skipped: {reason}" if reason else to_semi_structured(layers)
    else:
        facts["sparse_kernels"] = "none: unstructured zeros stay in dense storage and dense matmuls (pytorch#36214)"
    facts["prune_s"] = time.perf_counter() - start
    # process peak so far (Linux: KiB): global L1 holds all scores and kthvalue's copy at once
    facts["prune_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    detach_from_checkpoint(model)
    log.info("pruned %d layers (%s): %.1f%% zeros; sparse kernels: %s", len(layers), method, 100 * facts["sparsity_overall"], facts["sparse_kernels"])
    model.compression_facts = {**getattr(model, "compression_facts", {}), **facts}
    return model
