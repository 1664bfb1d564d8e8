"""Engines: one module each, holding both its offline generation and its server command, behind one small interface.

Every engine module has
  setup(cfg, params, device) -> (generate_fn, tokenizer, info)   offline: bind the engine to a technique's model
  server(entry, params, port, device, host) -> ServerSpec         online: the command that serves the same model
  unavailable(device) -> str | None                               (optional) why this machine cannot run it

`engine:` in params.yaml names one of ENGINES, for techniques and serving entries alike.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

ENGINES = ("transformers", "llama_cpp", "vllm")


def engine(name: str) -> ModuleType:
    """The module of engine `name` (imported on first use: llama.cpp and vLLM load only when asked for)."""
    if name not in ENGINES:
        from headline_bench.errors import InputError

        raise InputError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return importlib.import_module(f"headline_bench.backends.{name}")


def unavailable(name: str, device: str) -> str | None:
    """Why engine `name` cannot run on `device`, or None."""
    check = getattr(engine(name), "unavailable", None)
    return check(device) if check else None


def setup(cfg: dict[str, Any], params: dict[str, Any], device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the technique's engine and bind it to the technique's model and generate kwargs."""
    return engine(cfg["engine"]).setup(cfg, params, device)
