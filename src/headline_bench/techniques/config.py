"""A technique's resolved settings, the device it runs on, and whether this machine can run it."""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from headline_bench.backends import unavailable
from headline_bench.errors import InputError, Skip
from headline_bench.models.ref import model_path
from headline_bench.settings import (
    Compile,
    DecodeLoop,
    DType,
    Engine,
    GenerateKwargs,
    Parallel,
    Params,
    Prune,
    Quantize,
    SettledParallel,
    Speculative,
    Vllm,
)


class ResolvedTechnique(BaseModel):
    """One technique as it runs: its entry over the `generate` section and `base`, every default from the schema.

    record() is what perf.json keeps under "config": the keys params.yaml set (plus role, engine, generate,
    batch_size, reference, name, model_name, dtype), so `dvc metrics diff` compares like with like across runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    role: str
    engine: Engine
    generate: GenerateKwargs
    batch_size: int
    reference: str | None
    name: str
    model_name: str | None
    dtype: DType
    quantize: Quantize | None = None
    prune: Prune | None = None
    compile: Compile | None = None
    speculative: Speculative | None = None
    parallel: SettledParallel | Parallel | None = None
    device_map: str | None = None
    max_memory: dict[str | int, str | int] | None = None
    threads: int | None = None
    only_on: str | None = None
    enabled: bool = True
    vllm: Vllm | None = None
    decode_loop: DecodeLoop | None = None

    def record(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def tp_size(self) -> int:
        """Tensor parallel ranks; `auto` must have been settled first (tensor_parallel.settle_size)."""
        size = self.parallel.tp_size if self.parallel else 1
        if size == "auto":
            raise InputError("parallel.tp_size 'auto' is settled by tp.settle_size before use")
        return int(size)


def resolve(params: Params, name: str) -> ResolvedTechnique:
    """The full settings of one technique: the schema's defaults, then the `generate` section, then its own entry."""
    entry = params.entry(name)
    section = params.generate
    if section is None:
        raise InputError("params.yaml: generate: missing (a technique needs it)")
    own = entry.model_dump(exclude_unset=True, exclude={"generate", "batch_size", "dtype"})
    generate = GenerateKwargs.model_validate({"max_new_tokens": section.max_new_tokens, "use_cache": section.use_cache, **entry.generate.kwargs()})
    settings = {"role": entry.role, "engine": entry.engine, "generate": generate, "batch_size": entry.batch_size or section.batch_size,
                "reference": entry.reference, **{k: getattr(entry, k) for k in own}, "name": name,
                "model_name": getattr(params.base, entry.role), "dtype": entry.dtype or params.base.dtype}
    return ResolvedTechnique.model_validate(settings)


def pick_device(setting: str) -> str:
    """`auto`: CUDA when there is a GPU, else the CPU. A named CUDA device that is not there is an error, never a
    silent CPU run (an 8B model on a CPU takes hours)."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        index = int(setting.split(":")[1]) if ":" in setting else 0
        if not torch.cuda.is_available():
            raise InputError(f"base.device is '{setting}' but torch sees no CUDA GPU (torch {torch.__version__}; is it the CPU build?)")
        if index >= torch.cuda.device_count():
            raise InputError(f"base.device is '{setting}' but only {torch.cuda.device_count()} GPU(s) are visible")
    return setting  # cpu, cuda or cuda:N: the schema allows nothing else


def check_hardware(cfg: ResolvedTechnique, device: str) -> None:
    """Raise Skip with the reason when this machine cannot run the technique as named."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if not cfg.enabled:
        raise Skip(f"disabled in params (techniques.{cfg.name}.enabled: false; `dvc exp run -S techniques.{cfg.name}.enabled=true` runs it)")
    if cfg.only_on and cfg.only_on != kind:
        raise Skip(f"only_on: {cfg.only_on} (params.yaml runs this technique on that device only; its comment there says why); this run is on {kind}")
    if cfg.device_map and gpus < 2:
        raise Skip(f"device_map={cfg.device_map!r} splits layers across GPUs; this machine has {gpus} GPU(s)")
    if reason := unavailable(cfg.engine, device):
        raise Skip(reason)
    if not cfg.parallel:
        return
    size = cfg.tp_size
    config = json.loads((model_path(cfg.model_name) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = {k: config[k] for k in ("num_attention_heads", "num_key_value_heads") if config.get(k)}
    if size < 2:  # tensor parallel shards attention heads over ranks: it needs two and both head counts divisible
        raise Skip(f"tensor parallel: no tp_size >= 2 divides {cfg.model_name}'s heads {heads} within this machine's {gpus} GPU(s)")
    for key, n in heads.items():
        if n % size:
            raise Skip(f"tensor parallel: {cfg.model_name} has {key}={n}, which tp_size={size} does not divide")
