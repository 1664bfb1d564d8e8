"""Tensor parallelism through transformers, started with torchrun."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headline_bench.children import run_child
from headline_bench.errors import InputError, Skip
from headline_bench.files import ROOT
from headline_bench.logs import log

if TYPE_CHECKING:
    from headline_bench.techniques.config import ResolvedTechnique

GENERATE = ROOT / "stages" / "generate.py"


LOOPBACK = "127.0.0.1"


MEMORY_KEYS = ("peak_rss_mb", "max_allocated_mb", "max_reserved_mb", "weight_mb")  # each rank holds its shard


def choose_size(heads: int, kv_heads: int, gpus: int, device: str) -> int:
    """A tp_size that divides both head counts: on CUDA the largest that the GPUs allow (1 if none does), on a CPU
    the smallest above 1 (gloo ranks on a CPU show correctness, not speed, so fewer processes is better)."""
    common = math.gcd(heads, kv_heads or heads)
    divisors = [d for d in range(2, common + 1) if common % d == 0]
    if device.startswith("cuda"):
        return max((d for d in divisors if d <= gpus), default=1)
    return min(divisors, default=1)


def settle_size(cfg: ResolvedTechnique, device: str, model_config: dict[str, Any]) -> ResolvedTechnique:
    """cfg with `parallel.tp_size: auto` replaced by choose_size() for this model and machine (recorded as chosen)."""
    if cfg.parallel is None or cfg.parallel.tp_size != "auto":
        return cfg
    import torch

    from headline_bench.settings import SettledParallel

    text = model_config.get("text_config", model_config)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    size = choose_size(text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"], gpus, device)
    return cfg.model_copy(update={"parallel": SettledParallel(tp_size=size, tp_size_setting="auto")})


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(cfg: ResolvedTechnique) -> bool:
    """True in the stage's first process when the technique wants transformers TP (vLLM does its own)."""
    return cfg.engine == "transformers" and cfg.tp_size > 1 and not under_torchrun()


def free_port() -> int:
    """A TCP port free on the loopback interface right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def single_node() -> bool:
    """No multi-node rendezvous configured through torchrun's PET_* variables."""
    return int(os.environ.get("PET_NNODES", "1")) == 1 and "PET_RDZV_ENDPOINT" not in os.environ


def launch_command(technique: str, size: int, script: Path = GENERATE, extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m torch.distributed.run ... <script> <technique> <extra...>`; single node unless PET_NNODES says otherwise.

    On one node the rendezvous is torchrun's static one on 127.0.0.1 and a free port (`--master-addr/--master-port`),
    not `--standalone`: that one is the c10d dynamic rendezvous, whose agents unpickle the rendezvous state they read
    from a TCP store that listens on every interface. The static one's store would too; techniques/torchrun.py binds
    it to 127.0.0.1 (checked with `ss` in tests/test_integrity.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    nodes = int(os.environ.get("PET_NNODES", "1"))
    if single_node():  # torchrun's store would listen on every interface: started bound to loopback first (techniques/torchrun.py)
        cmd = [sys.executable, "-m", "headline_bench.techniques.torchrun", "--nnodes", "1", "--master-addr", LOOPBACK, "--master-port", str(free_port())]
    if "PET_NPROC_PER_NODE" not in os.environ:
        if size % nodes:
            raise InputError(f"tp_size {size} is not a multiple of PET_NNODES={nodes}")
        cmd += ["--nproc_per_node", str(size // nodes)]
    return cmd + [str(script), technique, *extra]


def launch_env(per_node: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: cores shared between the ranks (no oversubscription) and, on one node, gloo and NCCL
    bound to the loopback interface (their sockets then accept no connection from another machine). Values the
    user set win."""
    env = dict(os.environ) | (extra or {})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    if single_node():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def launch(technique: str, size: int, script: Path = GENERATE, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> int:
    """Run `script technique` as `size` ranks under torchrun and return torchrun's exit code.

    Args:
        technique: the argument each rank's script gets (the technique name).
        size: tensor parallel size (total ranks over all nodes).
        script: the rank entry point; generate.py itself in the pipeline.
        env: extra environment for the ranks (the checkpoint lock the launcher holds).
        extra: more arguments for each rank's script (generate.py's `--process k --out file`).
    """
    cmd = launch_command(technique, size, script, extra)
    per_node = int(cmd[cmd.index("--nproc_per_node") + 1]) if "--nproc_per_node" in cmd else size
    log.info("%s: tensor parallel over %d ranks: %s", technique, size, " ".join(cmd))
    return run_child(cmd, launch_env(per_node, env))  # torchrun dies with the stage, and its ranks with it (timed_process)


def init(cfg: ResolvedTechnique, device: str) -> None:
    """Inside a rank: check the world matches tp_size, bind the GPU and start the process group."""
    import torch
    import torch.distributed as dist

    if not under_torchrun():
        raise InputError(f"technique '{cfg.name}' needs torchrun; `python stages/generate.py <technique>` starts it")
    size, world = cfg.tp_size, int(os.environ["WORLD_SIZE"])
    if world != size:
        raise InputError(f"tp_size is {size} but torchrun started {world} processes")
    if device.startswith("cuda"):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < per_node:
            raise Skip(f"tensor parallel wants {per_node} GPUs per node; this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def load_kwargs(cfg: ResolvedTechnique, device: str) -> dict[str, Any]:
    """from_pretrained kwargs that shard the model over the ranks (transformers 5.x API)."""
    from transformers.distributed import DistributedConfig

    init(cfg, device)
    return {"distributed_config": DistributedConfig(tp_size=cfg.tp_size)}


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

    The ranks exchange a float tensor of MEMORY_KEYS (NaN for a missing value), never pickled objects: unpickling
    what a peer sends would run whatever it sends.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return perf
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([math.nan if perf.get(k) is None else float(perf[k]) for k in MEMORY_KEYS], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    ranks = [{k: None if math.isnan(v) else v for k, v in zip(MEMORY_KEYS, t.tolist())} for t in gathered]
    merged = merge_memory(perf, ranks) | {"tp_size": dist.get_world_size(), "tp_backend": dist.get_backend()}
    dist.destroy_process_group()
    return merged
