"""Shared helpers for the stages: params, paths, JSON I/O, logging and environment facts."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
MODELS = Path("data/models")
GENERATIONS = Path("data/generations")
METRICS = Path("metrics")
TECHNIQUE_METRICS = METRICS / "techniques"

log = logging.getLogger("headline-bench")


class Skip(Exception):
    """Raised when a technique cannot run here; the message is the recorded reason."""


class InputError(Exception):
    """Bad input data; the message is the one-line error shown to the user."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def load_params(path: Path = PARAMS) -> dict[str, Any]:
    """All of params.yaml; stages pick the sections they declare in dvc.yaml."""
    with open(path) as f:
        return yaml.safe_load(f)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON Lines; a broken line is an InputError naming file and line, not a traceback."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: broken JSON line ({e.msg})") from None
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict[str, Any]:
    """Hardware and library versions, recorded next to every number."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({info['cpu']}, {info['cpu_count']} cores)"
        info["gpu_count"] = 0
    return info


def fail(message: str) -> None:
    """Exit with a clear one-line error (no traceback) for bad input or config."""
    log.error(message)
    sys.exit(f"error: {message}")
