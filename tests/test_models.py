"""The models stage's output (data/models, a DVC-cached output every generate stage depends on) is a pure function of
its inputs: a second conversion writes the same bytes, so rebuilding it stales nothing downstream."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from headline_bench.models.convert import convert
from headline_bench.settings import ModelEntry


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_conversion_writes_the_same_bytes_twice(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved checkpoint and a seeded random build, each converted twice under a clock whose every interval differs:
    identical files, source.json included (a conversion time written into it changed the output every rebuild)."""
    clock = itertools.accumulate(itertools.count(1.0))  # 1, 3, 6, 10, ...: no two intervals alike
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    for name, spec in {"local": ModelEntry(path=str(tiny_llama)),
                       "random": ModelEntry(config=str(tiny_llama / "config.json"), tokenizer_from="local", seed=3)}.items():
        first, second = (convert(name, spec, tmp_path / run / name, {"local": ModelEntry(path=str(tiny_llama))}) for run in ("a", "b"))
        assert first == second
        a, b = files(tmp_path / "a" / name), files(tmp_path / "b" / name)
        assert "source.json" in a and a == b
