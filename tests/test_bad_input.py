"""Bad model files and extreme rows: one line naming the file, or the row set aside and counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_generate import BASE_PARAMS

from conftest import ROOT
from headline_bench.benchmark import generate
from headline_bench.settings import parse


def test_a_10000_token_summary_is_set_aside_and_counted(models_dir: Path) -> None:  # noqa: F811
    rows = [{"id": "ok", "summary": "the city council vote", "reference": "x"}, {"id": "huge", "summary": "news " * 2000, "reference": "y"}]
    records, perf = generate("kv_cache", parse(BASE_PARAMS), rows)
    huge = next(r for r in records if r["id"] == "huge")
    assert huge["prediction"] is None and "tokens > limit 600" in huge["skipped"] and int(huge["skipped"].split()[2]) > 10_000
    assert perf["rows_too_long"] == 1 and perf["samples"] == 1


def models_stage(tmp_path: Path, entry: dict) -> subprocess.CompletedProcess:
    """Run the models stage on a fake GGUF package `fakegguf` (a folder on PYTHONPATH holding model.gguf)."""
    params = {"base": {"seed": 1, "model": "fake", "target": "fake"}, "models": {"fake": {"gguf_package": "fakegguf", "gguf_file": "model.gguf", **entry}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, str(ROOT / "stages/models.py")], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def corrupt_gguf(tmp_path: Path) -> Path:
    package = tmp_path / "site/fakegguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF" + os.urandom(2048))
    return package / "model.gguf"


def test_wrong_sha256_is_one_line_naming_the_file(tmp_path: Path, corrupt_gguf: Path) -> None:
    out = models_stage(tmp_path, {"sha256": "0" * 64})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: models: fake: {corrupt_gguf}: sha256 ") and last.endswith(f"does not match params ({'0' * 64})")


def test_corrupt_gguf_is_one_line_naming_the_file(tmp_path: Path, corrupt_gguf: Path) -> None:
    out = models_stage(tmp_path, {})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: models: fake: {corrupt_gguf}: not a readable GGUF file (") and "reinstall its package" in last
