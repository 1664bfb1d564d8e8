"""Test fixtures: stages/ on the path, and a tiny random Llama saved like a converted model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "stages"))
torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def isolated_checkpoints(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() resumes from .cache/checkpoints: tests never read or leave one in the worktree."""
    import checkpoint

    monkeypatch.setattr(checkpoint, "CHECKPOINTS", tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture()
def models_dir(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/models with the tiny model as `tiny`, for stages that look models up by name."""
    import common
    import techniques

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "tiny" / "source.json").write_text('{"name": "tiny", "id": "tiny-random-llama"}')
    monkeypatch.setattr(techniques, "MODELS", tmp_path)
    monkeypatch.setattr(common, "MODELS", tmp_path)
    return tmp_path
