"""The install travels: exact versions from requirements.lock, llama.cpp built without GGML_NATIVE/AMX for any x86-64
CPU, and every run's fingerprint saying which versions and which llama.cpp build it measured."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from headline_bench.measure import environment

SAPPHIRE_RAPIDS = "fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512bw avx512dq avx512vl avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"
ZEN3 = "fpu sse4_2 avx avx2 fma f16c bmi2"


def cmake_args(flags: str) -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "scripts/llama-cmake-args")], env={"FLAGS": flags, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"-D(\w+)=(\w+)", out))


def test_llama_build_never_native_never_amx() -> None:
    """GGML_NATIVE turns on ggml's AMX code on AMX CPUs (SIGILL in worker threads); the flags are listed instead."""
    amx = cmake_args(SAPPHIRE_RAPIDS)
    assert amx["GGML_NATIVE"] == "OFF" and amx["GGML_AVX512"] == "ON" and amx["GGML_AVX512_BF16"] == "ON"
    assert amx["GGML_AMX_TILE"] == amx["GGML_AMX_INT8"] == amx["GGML_AMX_BF16"] == "OFF"


def test_llama_build_without_avx512_lists_none_of_it() -> None:
    zen3 = cmake_args(ZEN3)
    assert zen3["GGML_NATIVE"] == "OFF" and zen3["GGML_AVX2"] == zen3["GGML_FMA"] == "ON"
    assert {zen3[k] for k in ("GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI")} == {"OFF"}


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec and not spec.startswith("-"):
            names.add(environment.normalise(re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0]))
    return names


def test_the_lock_pins_every_requirement_exactly() -> None:
    """requirements.lock (scripts/lock) pins each requirement of requirements.txt with ==, and nothing is installed
    editable (stages import the workspace's own src/)."""
    lock = (ROOT / "requirements.lock").read_text()
    pins = environment.locked(ROOT / "requirements.lock")
    assert requirement_names((ROOT / "requirements.txt").read_text()) <= set(pins)
    assert "-e " not in lock and pins["transformers"] == "5.24.0"  # 5.25.0 broke universal assisted decoding


def test_setup_and_ci_install_from_the_lock() -> None:
    setup = (ROOT / "scripts/setup").read_text()
    assert "-r requirements.lock" in setup and "llama-cmake-args" in setup
    assert "scripts/setup" in (ROOT / ".ci/run").read_text()
    assert "scripts/setup" in (ROOT / "README.md").read_text().split("```")[1]  # README's first commands


def test_drift_from_the_lock_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"torch=={environment.versions()['torch']}\n    # via -r requirements.txt\nTransformers==0.0.1\nnot-a-real-dist==1.0\n")
    drift = environment.lock_drift(lock)
    assert drift == [f"transformers installed {environment.versions()['transformers']}, lock 0.0.1", "not-a-real-dist installed missing, lock 1.0"]


def test_the_fingerprint_records_versions_and_the_llama_build() -> None:
    pytest.importorskip("llama_cpp")
    env = environment.env_info("llama_cpp")
    assert set(environment.VERSIONED) <= set(env["versions"]) and env["versions"]["transformers"]
    assert env["llama_cpp_build"].startswith("CPU :") and "AMX_INT8 = 1" not in env["llama_cpp_build"]
    assert "llama_cpp_build" not in environment.comparable(environment.fingerprint(env))  # the engine's, like `engine`
