"""Test fixtures: the stage scripts as modules, and a tiny random Llama saved like a converted model."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "stages"))
import _workspace  # noqa: E402, F401  (headline_bench from this checkout's src/, here and in subprocesses)

torch.set_num_threads(1)

PIPELINE_FILES = ["dvc.yaml", "pipelines"]  # what a copy of the project needs to run its pipeline: the root file and the stage groups'


def pipeline_stages() -> dict[str, dict]:
    """Every stage of the pipeline as written: dvc.yaml at the root and the stage groups' pipelines/<group>/dvc.yaml."""
    import yaml

    files = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]
    return {name: stage for path in files for name, stage in yaml.safe_load(path.read_text())["stages"].items()}


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and a byte-level tokenizer (one token per byte, like GPT-2's
    alphabet without merges), saved with save_pretrained like a converted model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: i + 3 for i, ch in enumerate(sorted(alphabet))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def stage(name: str) -> ModuleType:
    """stages/<name>.py loaded as a module (stage scripts are entry points, not a package), for running main() in-process."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_models_dir(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Point every module that looks models up by name at `path` instead of data/models."""
    from headline_bench.measure import checkpoints
    from headline_bench.models import convert, ref

    for module in (ref, convert, checkpoints):
        monkeypatch.setattr(module, "MODELS", path)


@pytest.fixture(autouse=True)
def isolated_checkpoints(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() resumes from .cache/checkpoints: tests never read or leave one in the worktree."""
    from headline_bench.measure import checkpoints as checkpoint

    monkeypatch.setattr(checkpoint, "CHECKPOINTS", tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(autouse=True)
def isolated_timing_lock(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed sections take the machine-wide timing lock: tests use their own, so a benchmark running on the same
    machine neither waits for the tests nor makes them wait (subprocesses inherit the variable)."""
    from headline_bench.measure import timing_lock

    monkeypatch.setenv(timing_lock.PATH_ENV, str(tmp_path_factory.mktemp("timing") / "timing.lock"))
    monkeypatch.delenv(timing_lock.HELD_ENV, raising=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture()
def models_dir(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/models with the tiny model as `tiny`, for stages that look models up by name."""
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "tiny" / "source.json").write_text('{"name": "tiny", "id": "tiny-random-llama"}')
    use_models_dir(monkeypatch, tmp_path)
    return tmp_path
