"""Tensor parallelism through transformers, started with torchrun."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from headline_bench.errors import InputError, Skip
from headline_bench.files import ROOT
from headline_bench.logs import log

GENERATE = ROOT / "stages" / "generate.py"


MEMORY_KEYS = ("peak_rss_mb", "max_allocated_mb", "max_reserved_mb", "weight_mb")  # each rank holds its shard


def tp_size(cfg: dict[str, Any]) -> int:
    """The technique's tensor parallel size; `auto` must have been settled first (settle_size)."""
    size = (cfg.get("parallel") or {}).get("tp_size", 1)
    if size == "auto":
        raise InputError("parallel.tp_size 'auto' is settled by tp.settle_size before use")
    return int(size)


def choose_size(heads: int, kv_heads: int, gpus: int, device: str) -> int:
    """A tp_size that divides both head counts: on CUDA the largest that the GPUs allow (1 if none does), on a CPU
    the smallest above 1 (gloo ranks on a CPU show correctness, not speed, so fewer processes is better)."""
    common = math.gcd(heads, kv_heads or heads)
    divisors = [d for d in range(2, common + 1) if common % d == 0]
    if device.startswith("cuda"):
        return max((d for d in divisors if d <= gpus), default=1)
    return min(divisors, default=1)


def settle_size(cfg: dict[str, Any], device: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """cfg with `parallel.tp_size: auto` replaced by choose_size() for this model and machine (recorded as chosen)."""
    parallel = cfg.get("parallel") or {}
    if parallel.get("tp_size") != "auto":
        return cfg
    import torch

    text = model_config.get("text_config", model_config)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    size = choose_size(text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"], gpus, device)
    return {**cfg, "parallel": {**parallel, "tp_size": size, "tp_size_setting": "auto"}}


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(cfg: dict[str, Any]) -> bool:
    """True in the stage's first process when the technique wants transformers TP (vLLM does its own)."""
    return cfg.get("engine", "transformers") == "transformers" and tp_size(cfg) > 1 and not under_torchrun()


def launch_command(technique: str, size: int, script: Path = GENERATE, extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m torch.distributed.run ... <script> <technique> <extra...>`; single node unless PET_NNODES says otherwise."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    nodes = int(os.environ.get("PET_NNODES", "1"))
    if nodes == 1 and "PET_RDZV_ENDPOINT" not in os.environ:
        cmd.append("--standalone")  # local rendezvous on a free port: no clash with other jobs on 29500
    if "PET_NPROC_PER_NODE" not in os.environ:
        if size % nodes:
            raise InputError(f"tp_size {size} is not a multiple of PET_NNODES={nodes}")
        cmd += ["--nproc_per_node", str(size // nodes)]
    return cmd + [str(script), technique, *extra]


def launch(technique: str, size: int, script: Path = GENERATE, extra: tuple[str, ...] = ()) -> int:
    """Run `script technique` as `size` ranks under torchrun and return torchrun's exit code.

    Args:
        technique: the argument each rank's script gets (the technique name).
        size: tensor parallel size (total ranks over all nodes).
        script: the rank entry point; generate.py itself in the pipeline.
        extra: more arguments for each rank's script (generate.py's `--process k --out file`).
    """
    cmd = launch_command(technique, size, script, extra)
    env = dict(os.environ)
    per_node = int(cmd[cmd.index("--nproc_per_node") + 1]) if "--nproc_per_node" in cmd else size
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))  # share the cores, don't oversubscribe
    log.info("%s: tensor parallel over %d ranks: %s", technique, size, " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode


def init(cfg: dict[str, Any], device: str) -> None:
    """Inside a rank: check the world matches tp_size, bind the GPU and start the process group."""
    import torch
    import torch.distributed as dist

    if not under_torchrun():
        raise InputError(f"technique '{cfg.get('name')}' needs torchrun; `python stages/generate.py <technique>` starts it")
    size, world = tp_size(cfg), int(os.environ["WORLD_SIZE"])
    if world != size:
        raise InputError(f"tp_size is {size} but torchrun started {world} processes")
    if device.startswith("cuda"):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < per_node:
            raise Skip(f"tensor parallel wants {per_node} GPUs per node; this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def load_kwargs(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """from_pretrained kwargs that shard the model over the ranks (transformers 5.x API)."""
    from transformers.distributed import DistributedConfig

    init(cfg, device)
    return {"distributed_config": DistributedConfig(tp_size=tp_size(cfg))}


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def merge_memory(perf: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's perf with each memory number summed over the ranks (the per-rank values kept alongside).

    Args:
        perf: rank 0's perf dict (latency and throughput stay rank 0's).
        ranks: one {memory key: value} dict per rank, in rank order.
    """
    out = dict(perf)
    for key in MEMORY_KEYS:
        values = [r.get(key) for r in ranks]
        if values and all(v is not None for v in values):
            out[key] = sum(values)
            out[f"{key}_per_rank"] = values
    return out


def merge_ranks(perf: dict[str, Any]) -> dict[str, Any]:
    """Collective: every rank calls it after generating and gets its perf with memory summed over ranks;
    rank 0's is the one written. A no-op outside torchrun. Ends the process group, so call it once, last.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return perf
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {k: perf.get(k) for k in MEMORY_KEYS})
    merged = merge_memory(perf, ranks) | {"tp_size": dist.get_world_size(), "tp_backend": dist.get_backend()}
    dist.destroy_process_group()
    return merged
