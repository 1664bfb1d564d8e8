"""Shared helpers for the stages: params, paths, JSON I/O, logging and environment facts."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
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


# Third-party notices that ask nothing of the user, dropped in this one place (everything else still shows):
# logger name -> message pattern. torchao tries its CUDA / other-Python kernels on every import; torch warns
# that torchao registers an Enum with pytree. They are logging records (not `warnings`), so each gets a filter
# on its own logger, added when common is imported, before torch/torchao load.
QUIET_LOGS = {
    "torchao": r"Failed to load .*_C_|Skipping import of cpp extensions due to incompatible torch version",
    "torchao.kernel.intmm": r"Detected no triton",  # triton kernels are for GPUs; torch.compile says so itself if one lacks it
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported",
}


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    for name, pattern in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(pattern))


quiet_third_party()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def load_params(path: Path = PARAMS, required: Iterable[str] = ()) -> dict[str, Any]:
    """All of params.yaml, checked against the one schema (stages/schema.py) before any work is done.

    Every problem is logged as one `error:` line naming the key and what it allows, then the stage exits
    (no traceback). Stages pick the sections they declare in dvc.yaml.

    Args:
        path: the params file.
        required: sections this stage reads; their absence is an error here rather than a KeyError later.
    """
    import schema  # pydantic, imported only by the stages

    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        fail(f"{path}: not found (run the stage from the repository root)")
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    problems = schema.check(params)
    problems += [f"{section}: missing (this stage needs it)" for section in required if isinstance(params, dict) and section not in params]
    if problems:
        fail("\n".join(f"{path}: {p}" for p in problems))
    return params


def read_jsonl(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read JSON Lines; a broken line or undecodable bytes are an InputError naming file and line, not a traceback."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise InputError(undecodable(path, i, raw, e, encoding)) from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: broken JSON line ({e.msg})") from None
    return rows


def undecodable(path: Path, line: int, raw: bytes, error: UnicodeDecodeError, encoding: str) -> str:
    """The one-line message for bytes that are not `encoding`, with the encoding that reads them."""
    bad = raw[error.start : error.end]
    guess = next((enc for enc in ("utf-8", "cp1252", "latin-1") if enc != encoding and _decodes(raw, enc)), "latin-1")
    return f"{path}:{line}: byte(s) {bad.hex(' ')} are not {encoding}; set prepare.encoding (this line reads as {guess})"


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


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
    """Exit with a clear one-line error per problem (no traceback) for bad input or config."""
    lines = message.splitlines() or [message]
    for line in lines:
        log.error(line)
    sys.exit("\n".join(f"error: {line}" for line in lines))
