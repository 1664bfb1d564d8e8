"""Tensor parallel: torchrun relaunch, 2 gloo ranks on CPU giving the single-process greedy tokens, rank-0 merging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from headline_bench.backends.transformers import hf_generate
from headline_bench.benchmark import generate
from headline_bench.errors import InputError, Skip
from headline_bench.settings import parse
from headline_bench.techniques import tensor_parallel as tp
from headline_bench.techniques.config import ResolvedTechnique, resolve

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Generate a headline: council freezes taxes\nHeadline:", "Generate a headline: the senator retires\nHeadline:"]
# One rank: load the tiny model sharded, generate, merge memory over ranks; rank 0 writes what it got.
RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from headline_bench.techniques import tensor_parallel as tp
from headline_bench.backends.transformers import hf_generate
from headline_bench.measure.trackers import MemoryTracker
from headline_bench.settings import parse
from headline_bench.techniques.config import resolve

settings = {"base": {"model": "tiny"}, "generate": {"max_new_tokens": 8}, "techniques": {sys.argv[1]: {"parallel": {"tp_size": int(os.environ["WORLD_SIZE"])}}}}
cfg = resolve(parse(settings), sys.argv[1])
path = os.environ["TP_TEST_MODEL"]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **tp.load_kwargs(cfg, "cpu")).eval()
tok = AutoTokenizer.from_pretrained(path)
memory = MemoryTracker("cpu")
with memory.track():
    gens = [g for p in json.loads(os.environ["TP_TEST_PROMPTS"]) for g in hf_generate(model, tok, [p], "cpu", max_new_tokens=8, min_new_tokens=8)]
from headline_bench.measure.weights import weight_bytes
perf = tp.merge_ranks({"peak_rss_mb": memory.get_memory().peak_rss_mb, "latency_s_mean": sum(g.latency_s for g in gens) / len(gens),
                       "weight_mb": weight_bytes(model) / 2**20})
if tp.rank() == 0:
    rows = model.model.layers[0].mlp.up_proj.weight.to_local().shape[0]  # this rank's shard of intermediate_size
    out = {"raw": [g.raw for g in gens], "new_tokens": [g.new_tokens for g in gens], "up_proj_rows": rows, "perf": perf}
    Path(os.environ["TP_TEST_OUT"]).write_text(json.dumps(out))
"""
TORCHRUN_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_RDZV_ENDPOINT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)


def technique(entry: dict[str, Any]) -> ResolvedTechnique:
    """A technique as the stage resolves it from params.yaml."""
    return resolve(parse({"base": {"model": "tiny"}, "generate": {"max_new_tokens": 8}, "techniques": {"t": entry}}), "t")


def test_needs_launch_only_for_hf_tp_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tp.needs_launch(technique({"parallel": {"tp_size": 2}}))
    assert not tp.needs_launch(technique({})) and not tp.needs_launch(technique({"parallel": {"tp_size": 1}}))
    assert not tp.needs_launch(technique({"engine": "vllm", "parallel": {"tp_size": 2}}))  # vLLM shards by itself
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not tp.needs_launch(technique({"parallel": {"tp_size": 2}}))  # already a rank


def test_launch_command_single_and_multi_node(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = tp.launch_command("tensor_parallel", 2)
    assert cmd[:3] == [sys.executable, "-m", "headline_bench.techniques.torchrun"]  # torchrun, its store bound to loopback first
    # one node: torchrun's static rendezvous on loopback (no --standalone: its c10d rendezvous unpickles the store's state)
    assert "--standalone" not in cmd and "--rdzv-backend" not in cmd and cmd[cmd.index("--master-addr") + 1] == "127.0.0.1"
    assert 0 < int(cmd[cmd.index("--master-port") + 1]) < 65536 and cmd[cmd.index("--nnodes") + 1] == "1"
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[-2:] == [str(ROOT / "stages" / "generate.py"), "tensor_parallel"]
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = tp.launch_env(2, {"EXTRA": "x"})
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["NCCL_SOCKET_IFNAME"] == "lo" and env["EXTRA"] == "x" and env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("PET_NNODES", "2")  # torchrun reads the rendezvous from PET_* itself
    cmd = tp.launch_command("tensor_parallel", 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--master-addr" not in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert "GLOO_SOCKET_IFNAME" not in tp.launch_env(2)  # several nodes: the user's network settings
    with pytest.raises(InputError, match="not a multiple"):
        tp.launch_command("tensor_parallel", 3)
    monkeypatch.setenv("PET_NPROC_PER_NODE", "1")
    assert "--nproc_per_node" not in tp.launch_command("tensor_parallel", 2)


def test_merge_memory_sums_ranks_and_keeps_rank0_latency() -> None:
    perf = {"latency_s_mean": 0.5, "peak_rss_mb": 100.0, "max_allocated_mb": None}
    merged = tp.merge_memory(perf, [{"peak_rss_mb": 100.0, "max_allocated_mb": None}, {"peak_rss_mb": 120.0, "max_allocated_mb": None}])
    assert merged["peak_rss_mb"] == 220.0 and merged["peak_rss_mb_per_rank"] == [100.0, 120.0]
    assert merged["latency_s_mean"] == 0.5 and merged["max_allocated_mb"] is None and "max_allocated_mb_per_rank" not in merged
    assert tp.merge_ranks(perf) == perf  # outside torchrun: nothing to gather


def test_init_outside_torchrun_is_an_input_error() -> None:
    with pytest.raises(InputError, match="needs torchrun"):
        tp.init(technique({"parallel": {"tp_size": 2}}), "cpu")


def test_init_checks_world_and_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InputError, match="tp_size is 4 but torchrun started 2"):
        tp.init(technique({"parallel": {"tp_size": 4}}), "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Skip, match="wants 2 GPUs per node; this machine has 1"):
        tp.init(technique({"parallel": {"tp_size": 2}}), "cuda")


def single_process(path: Path) -> list:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return [g for p in PROMPTS for g in hf_generate(model, tok, [p], "cpu", max_new_tokens=8, min_new_tokens=8)]


def test_two_gloo_ranks_give_single_process_tokens(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real TP on CPU: each rank holds half of every sharded matrix, and greedy tokens are unchanged."""
    out, script = tmp_path / "rank0.json", tmp_path / "tp_rank.py"
    script.write_text(RANK_SCRIPT)
    for key, value in {"TP_TEST_MODEL": str(tiny_llama), "TP_TEST_OUT": str(out),
                       "TP_TEST_PROMPTS": json.dumps(PROMPTS)}.items():
        monkeypatch.setenv(key, value)
    assert tp.launch("tp_test", 2, script) == 0
    result = json.loads(out.read_text())
    assert result["up_proj_rows"] == 128 // 2  # intermediate_size split over 2 ranks
    single = single_process(tiny_llama)
    assert result["raw"] == [g.raw for g in single] and result["new_tokens"] == [8, 8]
    perf = result["perf"]
    assert perf["tp_size"] == 2 and perf["tp_backend"] == "gloo" and perf["latency_s_mean"] > 0
    assert len(perf["peak_rss_mb_per_rank"]) == 2 and perf["peak_rss_mb"] == pytest.approx(sum(perf["peak_rss_mb_per_rank"]))
    # weight bytes per rank: each rank holds its shard of every split matrix (the decoder linears, and the
    # embedding and lm_head split by vocabulary) plus its own copy of the rest (norms, rotary buffers)
    from headline_bench.measure.weights import weight_bytes

    single = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    split = sum(m.weight.numel() * 4 for m in single.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    replicated = weight_bytes(single) - split
    per_rank = [mb * 2**20 for mb in perf["weight_mb_per_rank"]]
    assert sum(per_rank) == pytest.approx(weight_bytes(single) + replicated)  # the shards add up; only the replicas count twice
    assert abs(per_rank[0] - per_rank[1]) <= 2 * 64 * 4  # vocab 259 splits 130/129: one embedding row and one lm_head row apart
    assert perf["weight_mb"] == pytest.approx(sum(perf["weight_mb_per_rank"]))


def test_generate_stage_relaunches_itself_under_torchrun(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python stages/generate.py tp2` in a repo-shaped folder: torchrun, 2 ranks, rank 0 writes, same tokens as kv_cache."""
    shutil.copytree(tiny_llama, tmp_path / "data/models/tiny")
    (tmp_path / "data/models/tiny/source.json").write_text('{"name": "tiny", "id": "tiny-random-llama"}')
    rows = [{"id": f"r{i}", "summary": s, "reference": "council vote"} for i, s in enumerate(["the city council vote", "a new budget for the city"])]
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/timed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {
        "base": {"seed": 1, "model": "tiny", "target": "tiny", "dtype": "float32", "device": "cpu"},
        "prompt": {"template": "headline for: {summary}", "few_shot": []},
        "generate": {"max_new_tokens": 6, "use_cache": True, "batch_size": 1, "warmup_runs": 0, "max_input_tokens": 200},
        "techniques": {"kv_cache": {}, "tp2": {"parallel": {"tp_size": 2}}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "stages/generate.py"), "tp2"], cwd=tmp_path, env=env, check=True, timeout=120)
    monkeypatch.chdir(tmp_path)  # the stage's relative data/ paths
    single, _ = generate("kv_cache", parse(params), rows)
    assert [json.loads(x)["raw"] for x in (tmp_path / "data/generations/tp2.jsonl").read_text().splitlines()] == [g["raw"] for g in single]
    perf = json.loads((tmp_path / "metrics/techniques/tp2/perf.json").read_text())
    assert perf["tp_size"] == 2 and perf["samples"] == 2 and len(perf["peak_rss_mb_per_rank"]) == 2


def test_merge_memory_sums_weight_shards() -> None:
    """Each rank holds a shard of every split matrix: the technique's weight bytes are the sum."""
    merged = tp.merge_memory({"weight_mb": 171.0}, [{"weight_mb": 171.0}, {"weight_mb": 171.0}, {"weight_mb": 171.0}])
    assert merged["weight_mb"] == 513.0 and merged["weight_mb_per_rank"] == [171.0] * 3
