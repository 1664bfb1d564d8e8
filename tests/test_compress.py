"""Compression on a tiny random Llama: sparsity actually reached, pruning made permanent, quantized bytes
counted from the storage (checked against bytes computed by hand from the layer shapes), and generation."""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from headline_bench.errors import Skip
from headline_bench.measure.weights import weight_breakdown, weight_bytes
from headline_bench.models.memory import detach_from_checkpoint
from headline_bench.settings import Prune, Quantize, check, parse
from headline_bench.techniques.config import resolve
from headline_bench.techniques.load import load_kwargs
from headline_bench.techniques.prune import apply_prune, global_l1, prunable, sparsity
from headline_bench.techniques.quantize import quantization_config

torch.set_num_threads(1)

QUANT_SPECS = {
    "quant8": {"method": "bnb", "bits": 8},
    "quant4": {"method": "bnb", "bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": False},
    "quant4_dq": {"method": "bnb", "bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": True},
    "torchao_int8": {"method": "torchao_int8"},
}


def tiny_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide initializer gives varied greedy tokens, so equality checks mean something
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


def load(path: Path, spec: dict | None) -> nn.Module:
    """The generate stage's load path: techniques.load_kwargs, then from_pretrained."""
    from transformers import AutoModelForCausalLM

    settings = {"base": {"model": "tiny"}, "generate": {"max_new_tokens": 12}, "techniques": {"t": {"quantize": spec} if spec else {}}}
    cfg = resolve(parse(settings), "t")
    return AutoModelForCausalLM.from_pretrained(path, **load_kwargs(cfg, "cpu")).eval()


def generate(model: nn.Module, use_cache: bool = True) -> torch.Tensor:
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(1))  # [B, S]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1]:]  # [B, new]


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every Linear except the tied lm_head, which no quantizer converts."""
    head = model.get_output_embeddings()
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def expected_quantized_bytes(name: str, shapes: list[tuple[int, int]]) -> int:
    """Bytes of the quantized linear weights, from the formats' definitions."""
    total = 0
    for out_f, in_f in shapes:
        n = out_f * in_f
        if name == "quant8":  # int8 data + one fp32 scale per output row (SCB)
            total += n + 4 * out_f
        elif name == "quant4":  # two nf4 values per byte + fp32 absmax per block of 64 + 16-entry fp32 code book
            total += n // 2 + 4 * (n // 64) + 16 * 4
        elif name == "quant4_dq":  # absmax itself in uint8, with fp32 absmax per 256 of them, a 256-entry code and an offset
            total += n // 2 + (n // 64) + 16 * 4 + 4 * math.ceil(n / 64 / 256) + 256 * 4 + 4
        elif name == "torchao_int8":  # int8 qdata + fp32 per-row scale + int8 per-row zero_point
            total += n + 4 * out_f + out_f
    return total


def assert_permanent(model: nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not prune.is_pruned(model)


def test_prune_l1_reaches_amount_and_is_permanent() -> None:
    model = tiny_model()
    keys = set(model.state_dict())
    embedding = model.get_input_embeddings().weight.detach().clone()
    apply_prune(model, Prune(method="l1_unstructured", amount=0.3))
    assert_permanent(model)
    assert set(model.state_dict()) == keys
    facts = model.compression_facts
    n = sum(o * i for o, i in linear_shapes(model))
    assert facts["sparsity_overall"] == pytest.approx(round(0.3 * n) / n, abs=1 / n)
    assert facts["sparsity_overall"] == sparsity(model)["sparsity_overall"]
    everything = sum(t.numel() for t in model.parameters())  # embedding (tied lm_head once) and norms too
    assert facts["sparsity_all_params"] == pytest.approx(round(0.3 * n) / everything, abs=2 / everything)
    assert facts["sparsity_all_params"] < facts["sparsity_overall"]
    assert facts["sparsity_layers"] == "14 Linear layers (lm_head excluded)"
    assert len(facts["sparsity_per_layer"]) == facts["pruned_layers"] == 14
    assert max(facts["sparsity_per_layer"].values()) > 0.3 > min(facts["sparsity_per_layer"].values())  # global, not per layer
    assert facts["lm_head_tied"] and not facts["lm_head_pruned"]
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # the tied lm_head/embedding is left whole
    assert generate(model).shape == (2, 12)


def test_global_l1_prunes_what_torch_prunes() -> None:
    """The same weights zeroed as torch.nn.utils.prune.global_unstructured (L1Unstructured) where no weight ties the
    threshold; with ties, the same count and no kept weight smaller than a pruned one."""
    ours, theirs = tiny_model(), tiny_model()
    layers = list(prunable(ours))
    prune.global_unstructured([(m, "weight") for _, m in prunable(theirs)], pruning_method=prune.L1Unstructured, amount=0.3)
    n = global_l1(layers, 0.3)
    assert n == round(0.3 * sum(m.weight.numel() for _, m in layers))
    for (_, a), (_, b) in zip(layers, prunable(theirs), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0)
        assert torch.equal(a.weight, b.weight)

    tied = tiny_model()  # values on a coarse grid, as GGUF-dequantized weights are: many weights equal the threshold
    layers = list(prunable(tied))
    with torch.no_grad():
        for _, m in layers:
            m.weight.copy_((m.weight * 8).round() / 8)
    before = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
    n = global_l1(layers, 0.3)
    after = torch.cat([m.weight.detach().flatten() for _, m in layers])
    threshold = before.kthvalue(n).values
    assert int((before == threshold).sum()) > 100  # the case this checks: many ties at the threshold
    assert int((after == 0).sum()) == n  # exactly round(0.3 x n), ties included (zeros already there count first)
    assert before[after == 0].max() <= before[after != 0].min()


def test_prune_2of4_two_zeros_per_group() -> None:
    model = tiny_model()
    apply_prune(model, Prune(method="2of4"))
    assert_permanent(model)
    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not head:
            zeros = (m.weight == 0).reshape(m.weight.shape[0], -1, 4).sum(-1)  # [out, in/4]
            assert torch.all(zeros == 2)
    facts = model.compression_facts
    assert facts["sparsity_overall"] == 0.5
    assert facts["sparse_kernels"].startswith("skipped: model is on cpu")
    assert generate(model).shape == (2, 12)


def test_prune_refuses_quantized_model(saved: Path) -> None:
    with pytest.raises(Skip, match="quantized"):
        apply_prune(load(saved, QUANT_SPECS["quant8"]), Prune(amount=0.3))


def test_fp32_bytes_are_numel_times_four(saved: Path) -> None:
    model = load(saved, None)
    tensors = list(model.parameters()) + list(model.buffers())
    assert weight_bytes(model) == sum(4 * t.numel() for t in tensors)  # the tied lm_head counted once
    assert weight_breakdown(model)["quantized_modules"] == 0


@pytest.mark.parametrize("name", list(QUANT_SPECS))
def test_quantized_bytes_match_the_format(saved: Path, name: str) -> None:
    dense = load(saved, None)
    shapes = linear_shapes(dense)
    other = weight_bytes(dense) - sum(4 * o * i for o, i in shapes)  # embedding, norms, rotary buffers: stay fp32
    model = load(saved, QUANT_SPECS[name])
    parts = weight_breakdown(model)
    assert parts["quantized_modules"] == len(shapes) == 14
    assert parts["quantized_linear_bytes"] == expected_quantized_bytes(name, shapes)
    assert parts["other_bytes"] == other
    assert weight_bytes(model) == parts["weight_bytes"] < weight_bytes(dense)
    assert generate(model).shape == (2, 12)


def test_torchao_footprint_misreports_and_we_do_not(saved: Path) -> None:
    model = load(saved, QUANT_SPECS["torchao_int8"])
    assert model.get_memory_footprint() >= weight_bytes(load(saved, None))  # Int8Tensor reports float32 elements
    assert weight_bytes(model) < 0.6 * model.get_memory_footprint()


def test_quant4_kv_cache_matches_no_cache(saved: Path) -> None:
    model = load(saved, QUANT_SPECS["quant4"])
    assert torch.equal(generate(model, use_cache=True), generate(model, use_cache=False))


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_detach_from_checkpoint_unmaps_the_file_and_keeps_the_model(saved: Path) -> None:
    model = load(saved, QUANT_SPECS["quant4"])
    before, nbytes = generate(model), weight_bytes(model)
    assert mapped(saved / "model.safetensors")  # the fp32 embedding is still a view of the file
    detach_from_checkpoint(model)
    gc.collect()  # models of earlier tests map the same file until collected
    assert not mapped(saved / "model.safetensors")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert weight_bytes(model) == nbytes
    assert torch.equal(generate(model), before)


def test_bad_quantize_settings_are_schema_errors_and_a_missing_library_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    def problems(spec: dict) -> list[str]:
        return check({"techniques": {"t": {"quantize": spec}}})

    assert problems({"bits": 8, "group": 4})[0].startswith("techniques.t.quantize.group: unknown key; allowed: bits,")
    assert problems({"bits": 3}) == ["techniques.t.quantize.bits = 3: should be 4 or 8"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(Skip, match="bitsandbytes is not installed"):
        quantization_config(Quantize(bits=4), "cpu", "float32")
    kwargs = quantization_config(Quantize(method="torchao_int8"), "cpu", "float32")
    assert kwargs["device_map"] == {"": "cpu"}


def test_torchao_int4_quantizes_every_linear_and_an_untied_head(saved: Path) -> None:
    """cpu_fast's int4: the head gets its own copy (the embedding lookup stays dense) and is quantized too."""
    from headline_bench.techniques.quantize import apply_quantize

    model = load(saved, None).to(torch.bfloat16)
    before = weight_bytes(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    model = apply_quantize(model, Quantize(method="torchao_int4", group_size=32, include_lm_head=True))
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    breakdown = weight_breakdown(model)
    assert breakdown["quantized_modules"] == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
    assert weight_bytes(model) < before
    assert generate(model).shape == (2, 12)
    assert apply_quantize(model, Quantize(method="bnb")) is model  # load-time methods pass through
