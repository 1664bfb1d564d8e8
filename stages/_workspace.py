"""Import headline_bench from this workspace's src/, in this process and in every process it starts.

Why: `dvc exp run --temp` and queued experiments run each stage in a copy of the workspace. An installed package
(editable or not) would be imported from wherever it was installed, so an experiment would run the main workspace's
code while its dvc.lock records the copy's hashes. Each entry point (stages/*.py, scripts/, tests/conftest.py)
imports this module first; PYTHONPATH carries the same src/ to child processes (timed processes, torchrun ranks,
servers, `python -m headline_bench...`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
_rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != SRC]
os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *_rest])
# torch.compile's cache in this workspace, not /tmp/torchinductor_<user> shared by every run on the machine: compile and
# warm-up times then depend on this workspace's own earlier runs only (a user's TORCHINDUCTOR_CACHE_DIR wins)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(SRC).parent / ".cache" / "inductor"))
