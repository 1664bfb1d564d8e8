"""Where a model named in params.yaml loads from, and where its weights came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headline_bench.errors import InputError
from headline_bench.files import MODELS


def model_path(name: str) -> Path:
    """The folder a model loads from: its converted copy in data/models, or the pinned hub snapshot in the hub cache."""
    path = MODELS / name
    if (path / "config.json").exists():
        return path
    source = path / "source.json"
    if source.exists():
        info = json.loads(source.read_text())
        if info.get("revision") and "id" in info and not info.get("random"):
            from huggingface_hub import snapshot_download

            from headline_bench.models.convert import HUB_FILES

            try:  # the pinned commit is already in the hub cache: no network
                return Path(snapshot_download(info["id"], revision=info["revision"], allow_patterns=HUB_FILES, local_files_only=True))
            except Exception:
                return Path(snapshot_download(info["id"], revision=info["revision"], allow_patterns=HUB_FILES))
    raise InputError(f"{path}: model not converted; run `dvc repro models`")


def model_source(name: str) -> dict[str, Any]:
    """data/models/<name>/source.json: where the weights came from (hub commit, GGUF sha256, random seed)."""
    path = MODELS / name / "source.json"
    return json.loads(path.read_text()) if path.exists() else {}
