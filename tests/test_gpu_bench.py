"""gpu_bench on CPU: the tiny config end to end through the per-technique subprocesses, the roofline
formula checked against the JSON's own numbers, and the card bandwidth table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

import gpu_bench

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


def test_roofline_share_matches_formula(run: tuple[dict, str]) -> None:
    report, _ = run
    assert report["bandwidth_bytes_per_s"] == BANDWIDTH_GBS * 1e9
    for row in timed_rows(report):
        if row["batch_size"] == 1:
            expected = row["decode_tokens_per_s_p50"] * row["weight_bytes"] / (BANDWIDTH_GBS * 1e9)
            assert row["roofline_share"] == pytest.approx(expected)
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


def test_mask_2of4_keeps_the_two_largest_of_each_four() -> None:
    weight = torch.randn(8, 16)
    mask = gpu_bench.mask_2of4(weight)
    groups, kept = weight.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert (kept.sum(dim=1) == 2).all()
    assert (groups[kept].reshape(-1, 2).min(dim=1).values >= groups[~kept].reshape(-1, 2).max(dim=1).values).all()


def test_tensor_bytes_counts_quantization_scales() -> None:
    packed = torch.zeros(10, dtype=torch.uint8)
    packed.quant_state = SimpleNamespace(absmax=torch.zeros(4), state2=None)  # bnb 4-bit
    int8 = torch.zeros(10, dtype=torch.int8)
    int8.SCB = torch.zeros(2)  # bnb 8-bit row scales
    assert gpu_bench.tensor_bytes(packed) == 10 + 16 and gpu_bench.tensor_bytes(int8) == 10 + 8
