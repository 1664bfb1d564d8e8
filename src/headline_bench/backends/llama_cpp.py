"""The llama.cpp engine: llama-cpp-python offline, its server, and llama.cpp's own llama-server."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headline_bench.backends.base import GenerateFn, Generation, ServerSpec, missing
from headline_bench.data.prompts import clean_headline, safe_ids
from headline_bench.errors import InputError, Skip
from headline_bench.models.convert import locate_gguf
from headline_bench.models.ref import model_path

if TYPE_CHECKING:
    from headline_bench.settings import Params, ServingEntry
    from headline_bench.techniques.config import ResolvedTechnique


def llamacpp_generate(llm: Any, prompts: list[str], max_new_tokens: int, stop: str = "\n") -> list[Generation]:
    """Greedy generation with llama.cpp, one prompt at a time, each from a cold KV cache.

    llama.cpp reuses the previous prompt's KV cache when prompts share a prefix (our chat template
    does), which flatters it; `reset()` per prompt measures what a fresh request costs, like the
    transformers backends. Tokens come from the low-level generator, so counts are exact ids, not
    stream chunks, and every sampled token (the one holding the newline or EOS included) counts,
    as in hf_generate.

    Args:
        llm: a llama_cpp.Llama.
        prompts: full prompt strings (chat template already applied).
        max_new_tokens: cap on sampled tokens.
        stop: stop after the token whose text contains this (the HF path's stop_strings).
    """
    from llama_cpp import llama_vocab_is_eog

    vocab = llm._model.vocab  # the end-of-generation test create_completion uses; EOS alone misses <|im_end|>-style ids

    def tokenize(text: str, special: bool) -> list[int]:  # the summary (special=False) is plain text to llama.cpp too
        return llm.tokenize(text.encode(), add_bos=False, special=special)

    results = []
    for prompt in prompts:
        llm.reset()
        tokens = safe_ids(getattr(prompt, "parts", [(prompt, True)]), tokenize, getattr(prompt, "controls", ()))
        ids: list[int] = []
        stamps: list[float] = []
        start = time.perf_counter()
        for tok in llm.generate(list(tokens), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            ids.append(tok)
            if llama_vocab_is_eog(vocab, tok) or stop in llm.detokenize([tok]).decode("utf-8", "ignore") or len(ids) >= max_new_tokens:
                break
        end = time.perf_counter()
        raw = llm.detokenize([t for t in ids if not llama_vocab_is_eog(vocab, t)]).decode("utf-8", "ignore")
        tpot = (stamps[-1] - stamps[0]) / (len(ids) - 1) if len(ids) > 1 else None
        ttft = stamps[0] - start if stamps else None
        results.append(Generation(clean_headline(raw), raw, len(tokens), len(ids), end - start, ttft, tpot, token_ids=list(ids)))
    return results


def gguf_format(llm: Any) -> str:
    """The GGUF file type (e.g. "Q4_1") from the file's metadata, named with llama.cpp's own constants."""
    import llama_cpp

    names = {v: k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_") for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_")}
    ftype = llm.metadata.get("general.file_type")
    return names.get(int(ftype), f"file_type {ftype}") if ftype is not None else "unknown"


def setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[GenerateFn, Any, dict[str, Any]]:
    """llama.cpp on the GGUF file that the model's pip package ships (the file data/models was converted from)."""
    try:
        from llama_cpp import Llama, __version__
    except ImportError:
        raise Skip("llama-cpp-python not installed: pip install llama-cpp-python (compiles ~7 min)") from None
    import torch
    from transformers import AutoTokenizer

    gguf = gguf_of(cfg.model_name, params)
    path = model_path(cfg.model_name)
    threads = cfg.threads or torch.get_num_threads()  # the thread count the transformers runs get
    max_new = cfg.generate.max_new_tokens
    n_ctx = params.generate.max_input_tokens + max_new
    start = time.perf_counter()
    llm = open_llama(Llama, gguf, n_ctx, threads, params.base.seed, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fmt = gguf_format(llm)
    info = {
        "path": str(path), "load_s": time.perf_counter() - start, "engine": f"llama-cpp-python {__version__}",
        "gguf": f"{params.models[cfg.model_name].gguf_package}/{gguf.name}", "weight_mb": os.path.getsize(gguf) / 2**20, "weight_format": f"GGUF {fmt}", "dtype": fmt.lower(),
        "n_threads": threads, "n_ctx": n_ctx, "max_input_tokens": llm.n_ctx() - max_new,
    }

    def generate_fn(prompts: list[str]) -> list[Generation]:
        return llamacpp_generate(llm, prompts, max_new)

    return generate_fn, tokenizer, info


def open_llama(llama: Any, gguf: Path, n_ctx: int, threads: int, seed: int, device: str, **extra: Any) -> Any:
    """A llama_cpp.Llama on the GGUF file (`extra`: e.g. logits_all), closed at exit."""
    try:
        llm = llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed,
                    n_gpu_layers=-1 if device.startswith("cuda") else 0, verbose=False, **extra)
    except ValueError as e:  # llama.cpp: "Failed to load model from file"
        raise InputError(f"{gguf}: llama.cpp cannot load this GGUF file ({e})") from None
    atexit.register(llm.close)  # free while the bindings still exist; __del__ at interpreter teardown raises
    return llm


def llamacpp_logits(llm: Any, sequences: list[list[int]], start: int) -> list[Any]:
    """Teacher forcing with llama.cpp: each sequence's logits [len(s) - start, V] at the positions predicting s[start:]
    (a Llama made with logits_all keeps every position's logits in `scores`).

    The first sequence is evaluated from an empty cache; a later one with the same first `start` tokens (the prompt)
    keeps the prompt's cache and evaluates only its own tokens (eval() drops the cache from `n_tokens` on): on SmolLM2's
    rows 0.52 instead of 0.83 s per row on a 2-core Intel, with logits equal to the last bit to evaluating it whole."""
    import torch

    out = []
    for i, s in enumerate(sequences):
        if i and s[:start] == sequences[0][:start]:
            llm.n_tokens = start
            llm.eval(s[start:])
        else:
            llm.reset()
            llm.eval(s)
        out.append(torch.from_numpy(llm.scores[start - 1 : len(s) - 1].copy()))
    return out


def forced_setup(cfg: ResolvedTechnique, params: Params, device: str) -> tuple[Any, dict[str, Any]]:
    """llama.cpp on the technique's GGUF file for teacher forcing (quality/teacher.py): every position's logits
    (logits_all), the same ids as baseline's fed directly (no tokenizing). Skip where llama-cpp-python or the GGUF is missing."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise Skip("n/a: llama-cpp-python not installed, so no llama.cpp logits") from None
    import torch

    gguf = gguf_of(cfg.model_name, params)
    threads = cfg.threads or torch.get_num_threads()
    n_ctx = params.generate.max_input_tokens + max(cfg.generate.max_new_tokens, 128)  # the reference headline may be longer than a generated one
    llm = open_llama(Llama, gguf, n_ctx, threads, params.base.seed, device, logits_all=True)
    return lambda sequences, start: llamacpp_logits(llm, sequences, start), {"engine": "llama.cpp", "dtype": gguf_format(llm).lower(),
                                                                             "vocab": llm.n_vocab()}


def llama_cpp_python_command(entry: ServingEntry, gguf: Path, port: int, device: str, n_ctx: int, seed: int, threads: int, host: str) -> list[str]:
    """llama-cpp-python's server: one Llama behind a lock, so one request at a time.

    Its default `interrupt_requests` cuts the stream being served whenever a new request arrives; the entry's
    `interrupt_requests` (false in params) decides, so that under load requests queue instead of being cut.
    """
    if need := missing("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        raise Skip(f"llama-cpp-python's server needs {', '.join(need)}: pip install 'llama-cpp-python[server]'")
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--seed", str(seed),
            "--n_gpu_layers", "-1" if device.startswith("cuda") else "0", "--interrupt_requests", str(entry.interrupt_requests)]


def llama_server_command(entry: ServingEntry, gguf: Path, port: int, device: str, n_ctx: int, seed: int, threads: int, host: str) -> list[str]:
    """llama.cpp's own llama-server: continuous batching over `parallel` slots (the context is split among them)."""
    binary = shutil.which(entry.binary) or shutil.which(entry.binary, path=str(Path(sys.executable).parent))
    if binary is None:
        raise Skip("no llama-server binary: run scripts/build-llama-server (builds it from the llama.cpp source that "
                   "llama-cpp-python's sdist carries into .venv/bin) or set serving.<entry>.binary")
    slots = entry.parallel
    return [binary, "-m", str(gguf), "--host", host, "--port", str(port), "-c", str(n_ctx * slots), "-np", str(slots), "--cont-batching",
            "-t", str(threads), "-tb", str(threads), "--seed", str(seed), "-ngl", "99" if device.startswith("cuda") else "0", "--no-webui"]


SERVERS = {"llama_cpp_python": (llama_cpp_python_command, "/v1/models"), "llama_server": (llama_server_command, "/health")}


def gguf_of(name: str, params: Params) -> Path:
    """The GGUF file model `name` was converted from; Skip when it came from elsewhere (hub, folder, random)."""
    spec = params.models.get(name)
    if spec is None or not spec.gguf_package:
        raise Skip(f"model '{name}' has no GGUF file in params.models (llama.cpp needs one)")
    return locate_gguf(spec)


def server(entry: ServingEntry, params: Params, port: int, device: str, host: str) -> ServerSpec:
    """llama-cpp-python's server or llama.cpp's llama-server (`entry.server`) on the packaged GGUF file."""
    import torch

    gguf = gguf_of(entry.model, params)
    n_ctx = params.generate.max_input_tokens + params.generate.max_new_tokens
    threads = entry.threads or torch.get_num_threads()
    kind = entry.server
    command, health = SERVERS[kind]
    argv = command(entry, gguf, port, device, n_ctx, params.base.seed, threads, host)
    vocab = gguf_vocab(gguf)
    return ServerSpec(argv, health, str(gguf), threads, {"gguf": str(gguf), "n_ctx": n_ctx, "threads": threads},
                      token_prompts=kind == "llama_server", prompt_ids=lambda prompt: offline_ids(vocab, prompt),
                      text_ids=None if kind == "llama_server" else lambda text: completion_ids(vocab, text))


def gguf_vocab(gguf: Path) -> Any:
    """The GGUF file's tokenizer alone (llama.cpp's vocab_only load: no weights)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    atexit.register(llm.close)
    return llm


def offline_ids(llm: Any, prompt: Any) -> list[int]:
    """The ids llamacpp_generate feeds for a prompt: llama.cpp's tokenizer, the summary as plain text, no BOS added."""
    return safe_ids(getattr(prompt, "parts", [(prompt, True)]), lambda text, special: llm.tokenize(text.encode(), add_bos=False, special=special),
                    getattr(prompt, "controls", ()))


def completion_ids(llm: Any, text: str) -> list[int]:
    """The ids llama-cpp-python's server makes of a text prompt (Llama._create_completion without suffix): BOS when the
    model adds one, the text with special tokens parsed, EOS/SEP when the model adds one. Its server takes only text
    (CreateCompletionRequest.prompt is str | list[str])."""
    model = llm._model
    bos = [llm.token_bos()] if model.add_bos_token() and llm.token_bos() != -1 else []
    sep = model.token_sep()
    eos = [] if not model.add_eos_token() and sep == -1 else [sep if sep != -1 else llm.token_eos()]
    return bos + llm.tokenize(text.encode(), add_bos=False, special=True) + eos
