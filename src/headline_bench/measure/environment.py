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


# the distributions whose version changes what a technique computes or how fast (kernels, decoding, quantization)
VERSIONED = ("torch", "transformers", "tokenizers", "accelerate", "torchao", "bitsandbytes", "llama-cpp-python", "vllm")

# what makes two measurements comparable: same machine, same libraries, same thread settings (env_info's keys)
FINGERPRINT_KEYS = ("host", "cpu", "cpu_id", "cpu_isa", "cpu_count", "device", "gpu_count", "python", "torch", "transformers", "engine",
                    "versions", "llama_cpp_build", "torch_threads", "omp_num_threads")

LOCK = Path(__file__).resolve().parents[3] / "requirements.lock"  # this workspace's lock (scripts/setup installs from it)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# instruction-set flags that change which CPU kernels torch, inductor and llama.cpp pick (bf16 without avx512_bf16 or
# amx_bf16 is emulated and ~3x slower than fp32; MKL and oneDNN pick their gemv paths by these too)
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_identity() -> tuple[str, str]:
    """(vendor family/model/stepping, kernel-relevant ISA flags) from /proc/cpuinfo.

    Cloud VMs report one model name ("AMD EPYC") for several generations: two sessions on "AMD EPYC" measured the same
    bf16 + int4 decode loop at 14 and 52 ms per token (docs/results/decode-cpu), the second on a Zen 3 (family 25 model
    1, AVX2 only). The name alone cannot tell such machines apart; family/model and these flags can."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    except OSError:
        return platform.machine(), "unknown"
    ident = f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}"
    flags = set(fields.get("flags", "").split())
    return ident, " ".join(f for f in KERNEL_FLAGS if f in flags) or "none"


def engine_version(engine: str) -> str:
    """"<package> <version>" of an engine, read from the installed distribution (nothing is imported)."""
    package = ENGINE_PACKAGES.get(engine, engine)
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} not installed"


def versions() -> dict[str, str | None]:
    """{distribution: installed version or None} for VERSIONED, read from metadata (nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def locked(path: Path = LOCK) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line of requirements.lock ({} when there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    pins = {}
    for line in text.splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec and not spec.startswith("-"):
            name, _, version = spec.partition("==")
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (Llama_CPP.python -> llama-cpp-python)."""
    return "-".join(name.strip().lower().replace("_", "-").replace(".", "-").split("-"))


def lock_drift(path: Path = LOCK) -> list[str]:
    """Installed distributions whose version differs from requirements.lock: "name installed X, lock Y" each.

    Why: a fresh `pip install -r requirements.txt` took transformers 5.25, which broke speculative decoding; a run on
    versions other than the tested ones must say so next to its numbers (the report flags it)."""
    drift = []
    for name, want in locked(path).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            drift.append(f"{name} installed {have or 'missing'}, lock {want}")
    return drift


def llama_cpp_build() -> str | None:
    """llama.cpp's compiled CPU feature line (llama_print_system_info), or None without llama-cpp-python.

    Why: the same llama-cpp-python version runs other kernels when built with other flags (GGML_NATIVE, AVX-512,
    AMX); an AMX build died with SIGILL. scripts/setup records its CMake flags in <venv>/llama-cmake-args."""
    import sys

    try:
        import llama_cpp
    except Exception:  # not installed, or its library does not load here
        return None
    line = llama_cpp.llama_print_system_info()
    line = (line.decode() if isinstance(line, bytes) else str(line)).strip()
    flags = Path(sys.prefix) / "llama-cmake-args"
    return line + (f" [cmake: {flags.read_text().strip()}]" if flags.exists() else "")


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
        **dict(zip(("cpu_id", "cpu_isa"), cpu_identity(), strict=True)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # None: unset (torch then uses every core)
        "platform": platform.platform(),
        "versions": versions(),
        "llama_cpp_build": llama_cpp_build() if engine in (None, "llama_cpp") else None,
        "lock_drift": lock_drift(),
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
    so the report groups techniques by this and names each technique's engine under its group (with llama.cpp's build line)."""
    return {k: v for k, v in fp.items() if k not in ("engine", "llama_cpp_build")}


def describe(fp: dict[str, Any]) -> str:
    """One line naming an environment (comparable() keys), for the report."""
    device = fp.get("device") if str(fp.get("device", "")).startswith("cpu") else f"{fp.get('device')} x {fp.get('gpu_count')}, CPU {fp.get('cpu')}"
    omp = fp.get("omp_num_threads")
    isa = f"; CPU {fp['cpu_id']} ({fp.get('cpu_isa')})" if fp.get("cpu_id") else ""
    return (f"host {fp.get('host', '?')}, {device}{isa}; Python {fp.get('python', '?')}, torch {fp.get('torch', '?')}, "
            f"transformers {fp.get('transformers', '?')}; torch threads {fp.get('torch_threads', '?')}, "
            f"OMP_NUM_THREADS {omp if omp is not None else 'unset'}")
