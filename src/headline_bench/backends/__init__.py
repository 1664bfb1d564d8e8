"""Engines: one module each, holding both its offline generation and its server command, behind one small interface.

Every engine module has
  setup(cfg, params, device) -> (generate_fn, tokenizer, info)   offline: bind the engine to a technique's model
  server(entry, params, port, device, host) -> ServerSpec         online: the command that serves the same model
  unavailable(device) -> str | None                               (optional) why this machine cannot run it

`engine:` in params.yaml names one of settings.ENGINES (the schema allows no other), for techniques and serving entries alike.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headline_bench.settings import Params
    from headline_bench.techniques.config import ResolvedTechnique


def engine(name: str) -> ModuleType:
    """The module of engine `name`, one of settings.ENGINES (imported on first use: llama.cpp and vLLM load only when asked for)."""
    return importlib.import_module(f"headline_bench.backends.{name}")


def unavailable(name: str, device: str) -> str | None:
    """Why engine `name` cannot run on `device`, or None."""
    check = getattr(engine(name), "unavailable", None)
    return check(device) if check else None


def setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the technique's engine and bind it to the technique's model and generate kwargs."""
    return engine(cfg.engine).setup(cfg, params, device)
