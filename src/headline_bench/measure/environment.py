"""Hardware, library versions and thread settings, recorded next to every number.

Each technique runs in its own process, possibly on another day, machine or thread count than the others, so
every perf.json carries the environment it was measured in and the report groups techniques by it
(`fingerprint`): numbers from two environments are not comparable, and the report says so."""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

# the pip distribution behind each engine of backends.ENGINES (its version is part of the environment)
ENGINE_PACKAGES = {"transformers": "transformers", "llama_cpp": "llama-cpp-python", "vllm": "vllm"}


# what makes two measurements comparable: same machine, same libraries, same thread settings (env_info's keys)
FINGERPRINT_KEYS = ("host", "cpu", "cpu_count", "device", "gpu_count", "python", "torch", "transformers", "engine",
                    "torch_threads", "omp_num_threads")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_version(engine: str) -> str:
    """"<package> <version>" of an engine, read from the installed distribution (nothing is imported)."""
    package = ENGINE_PACKAGES.get(engine, engine)
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} not installed"


def env_info(engine: str | None = None) -> dict[str, Any]:
    """Hardware, library versions and thread settings of this process (the fingerprint's keys and a few more).

    Args:
        engine: the technique's engine (backends.ENGINES); its package version is recorded as `engine` (left out
            when None, e.g. for a serving entry, whose serve.json names its engine itself).
    """
    import torch
    import transformers

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # None: unset (torch then uses every core)
        "platform": platform.platform(),
    }
    if engine is not None:
        info["engine"] = engine_version(engine)
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({info['cpu']}, {info['cpu_count']} cores)"
        info["gpu_count"] = 0
    return info


def fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    """The part of env_info() that decides whether two measurements are comparable (FINGERPRINT_KEYS)."""
    return {k: env.get(k) for k in FINGERPRINT_KEYS}


def comparable(fp: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint without the engine: the engine is the technique's choice (llama.cpp, vLLM), not the environment's,
    so the report groups techniques by this and names each technique's engine under its group."""
    return {k: v for k, v in fp.items() if k != "engine"}


def describe(fp: dict[str, Any]) -> str:
    """One line naming an environment (comparable() keys), for the report."""
    device = fp.get("device") if str(fp.get("device", "")).startswith("cpu") else f"{fp.get('device')} x {fp.get('gpu_count')}, CPU {fp.get('cpu')}"
    omp = fp.get("omp_num_threads")
    return (f"host {fp.get('host', '?')}, {device}; Python {fp.get('python', '?')}, torch {fp.get('torch', '?')}, "
            f"transformers {fp.get('transformers', '?')}; torch threads {fp.get('torch_threads', '?')}, "
            f"OMP_NUM_THREADS {omp if omp is not None else 'unset'}")
