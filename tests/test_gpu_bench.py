"""gpu_bench on CPU: the tiny config end to end through the per-technique subprocesses, the roofline
formula checked against the JSON's own numbers, the card bandwidth table, and how it calls compress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import compress
import gpu_bench
from common import Skip

BANDWIDTH_GBS = 20.0
NEW_TOKENS = 24
# static_compile is left out: compiling even the tiny model takes ~30 s on a cold CPU inductor cache.
RUN = "baseline,kv_cache,batched,prune_2of4,quant8,quant4"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu")
    cmd = [sys.executable, gpu_bench.__file__, "--config", "tiny", "--techniques", RUN, "--out", str(out), "--warmup", "1",
           "--iters", "2", "--new-tokens", str(NEW_TOKENS), "--batch-sizes", "1,8", "--cpu-bandwidth-gbs", str(BANDWIDTH_GBS)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # the CPU path, even on a GPU box
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "cpu.json").read_text()), proc.stdout


def timed_rows(report: dict) -> list[dict]:
    return [row for _, row in gpu_bench.rows(report["techniques"]) if "skipped" not in row]


def test_records_card_versions_and_config(run: tuple[dict, str]) -> None:
    report, stdout = run
    assert report["card"] == "cpu" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["transformers"]
    assert report["config"] == yaml.safe_load(gpu_bench.CONFIGS.read_text())["tiny"]
    assert (report["prompt_len"], report["new_tokens"]) == (60, NEW_TOKENS)
    assert list(report["techniques"]) == RUN.split(",")
    assert "| kv_cache |" in stdout and "| batched b=8 |" in stdout


def test_timings_are_consistent(run: tuple[dict, str]) -> None:
    report, _ = run
    assert report["techniques"]["kv_cache"]["decode_tokens_per_s_p50"] > 0
    rows = timed_rows(report)
    assert len(rows) == 4  # baseline, kv_cache, batched at 1 and 8
    for row in rows:
        assert row["generated_tokens"] == NEW_TOKENS
        assert 0 < row["ttft_s_p50"] <= row["latency_s_p50"] and row["ttft_s_mean"] <= row["latency_s_mean"]
        assert row["weight_bytes"] > 0 and row["peak_rss_mb"] > 0
    assert [report["techniques"]["batched"][k]["batch_size"] for k in ("batch_1", "batch_8")] == [1, 8]


def test_gpu_only_techniques_are_skipped_with_a_reason(run: tuple[dict, str]) -> None:
    report, _ = run
    for name in ("prune_2of4", "quant8", "quant4"):
        assert set(report["techniques"][name]) == {"skipped"} and report["techniques"][name]["skipped"]


def tiny_param_bytes() -> int:
    """fp32 bytes of the tiny config's parameters, counted by hand from its shapes (tied embedding counted once)."""
    c = yaml.safe_load(gpu_bench.CONFIGS.read_text())["tiny"]
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    attn = h * c["num_attention_heads"] * hd * 2 + h * c["num_key_value_heads"] * hd * 2  # q, o; k, v
    layer = attn + 3 * h * inter + 2 * h  # gate, up, down; two RMSNorms
    return 4 * (c["vocab_size"] * h + c["num_hidden_layers"] * layer + h)  # + final norm


def test_roofline_share_uses_the_bytes_the_model_holds(run: tuple[dict, str]) -> None:
    """Bytes from the config's shapes, not from the JSON: a wrong byte count or a wrong bandwidth fails here."""
    report, _ = run
    assert report["bandwidth_bytes_per_s"] == BANDWIDTH_GBS * 1e9
    expected_bytes = tiny_param_bytes()
    for row in timed_rows(report):
        assert row["weight_bytes"] == pytest.approx(expected_bytes, rel=1e-3)  # rotary buffers are the only extra bytes
        if row["batch_size"] == 1:
            assert row["roofline_share"] == pytest.approx(row["decode_tokens_per_s_p50"] * expected_bytes / 20e9, rel=1e-3)
        else:
            assert "roofline_share" not in row


def test_roofline_is_null_without_bandwidth() -> None:
    results = {"kv_cache": {"batch_size": 1, "decode_tokens_per_s_p50": 10.0, "weight_bytes": 100}, "quant8": {"skipped": "no"}}
    gpu_bench.add_roofline(results, None)
    assert results["kv_cache"]["roofline_share"] is None
    gpu_bench.add_roofline(results, 1e3)
    assert results["kv_cache"]["roofline_share"] == 1.0


@pytest.mark.parametrize("name, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA A100-PCIE-40GB", 1.555e12),
    ("NVIDIA L4", 0.3e12),
    ("NVIDIA A10G", 0.6e12),
    ("NVIDIA L40S", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_card_bandwidth_table(name: str, bandwidth: float | None) -> None:
    match = gpu_bench.card_bandwidth(name)
    assert (match[1] if match else None) == bandwidth


def test_card_slug() -> None:
    assert gpu_bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_techniques_are_recognized() -> None:
    assert gpu_bench.parse_args(["--techniques", "static_compile,kv_cache"]).techniques == ["static_compile", "kv_cache"]
    assert gpu_bench.parse_args([]).techniques == list(gpu_bench.TECHNIQUES)
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--techniques", "kv_cache,bogus"])


def test_2of4_prunes_the_decoder_linears_and_skips_with_compress_reason() -> None:
    model = gpu_bench.build_model(gpu_bench.load_configs()["tiny"], "cpu", torch.bfloat16)
    decoder = {f"model.layers.{i}.{name}" for i, layer in enumerate(model.model.layers)
               for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, _ in compress.prunable(model)} == decoder  # lm_head stays dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Skip, match="2:4 sparse kernels: ") as err:  # no CUDA here: skipped before pruning anything
        gpu_bench.apply_2of4(model)
    assert compress.sparse_kernel_support(model) in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quant_spec_gives_llm_int8_and_nf4_in_the_bench_dtype() -> None:
    pytest.importorskip("bitsandbytes")
    int8 = compress.quantization_config(gpu_bench.quant_spec(8, torch.bfloat16), "cuda")
    nf4 = compress.quantization_config(gpu_bench.quant_spec(4, torch.bfloat16), "cuda")
    assert int8["device_map"] == nf4["device_map"] == {"": "cuda"}
    assert int8["quantization_config"].load_in_8bit and int8["quantization_config"].llm_int8_threshold == 6.0
    q = nf4["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16 and not q.bnb_4bit_use_double_quant
