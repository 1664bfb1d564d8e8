"""Speed and memory of inference techniques on random-weight Llama architectures; writes metrics/gpu/<card-slug>.json.

Performance only: weights are random, built from the real configs in stages/gpu_configs.yaml (as
optimum-benchmark's `no_weights` does), so nothing is downloaded. Each technique runs in its own
subprocess (`--one <technique>`) so peak memory is per technique, and a failing one only skips itself.
Needs torch, transformers and pyyaml (bitsandbytes for quant8/quant4) plus the stages/ modules it shares:
compress (2:4 pruning, bitsandbytes configs, weight bytes) and trackers (timers, peak memory).

    python stages/gpu_bench.py --config llama-3.2-1b          # GPU, bf16
    python stages/gpu_bench.py --config tiny --out /tmp/gpu   # CPU, fp32 (the tests)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import Skip
from compress import apply_prune, quantization_config, sparse_kernel_support, weight_bytes
from trackers import LatencyTracker, MemoryTracker, TokenTimer

CONFIGS = Path(__file__).with_name("gpu_configs.yaml")
OUT_DIR = Path("metrics/gpu")
TECHNIQUES = ("baseline", "kv_cache", "static_compile", "batched", "prune_2of4", "quant8", "quant4")
QUANT_BITS = {"quant8": 8, "quant4": 4}
RESULT_TAG = "GPU_BENCH_RESULT "
TECHNIQUE_TIMEOUT_S = 600
# Peak HBM bandwidth (bytes/s) by card; first regex that matches torch.cuda.get_device_name() wins.
CARD_BANDWIDTH = [
    (r"\bH100\b.*PCIe", "H100 PCIe", 2.0e12),
    (r"\bH100\b.*NVL", "H100 NVL", 3.9e12),
    (r"\bH100\b", "H100 SXM", 3.35e12),
    (r"\bH200\b", "H200", 4.8e12),
    (r"\bA100\b.*SXM.*80GB", "A100 80GB SXM", 2.039e12),
    (r"\bA100\b.*80GB", "A100 80GB PCIe", 2.0e12),
    (r"\bA100\b", "A100 40GB", 1.555e12),
    (r"\bL4\b", "L4", 0.3e12),
    (r"\bA10G\b", "A10G", 0.6e12),
]

log = logging.getLogger("gpu_bench")


def card_bandwidth(name: str) -> tuple[str, float] | None:
    """(table label, bytes/s) for a CUDA device name, or None for a card not in the table."""
    for pattern, label, bandwidth in CARD_BANDWIDTH:
        if re.search(pattern, name, re.IGNORECASE):
            return label, bandwidth
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_configs() -> dict[str, dict]:
    return yaml.safe_load(CONFIGS.read_text())


def skip_reason(technique: str) -> str | None:
    """Why a GPU-only technique is not benchmarked here, decided before paying for a subprocess. What the
    child can still lack (sm80+ for the 2:4 kernels, bitsandbytes) compress decides, and its reason is recorded."""
    if technique in ("prune_2of4", "quant8", "quant4") and not torch.cuda.is_available():
        return f"{technique} is benchmarked on CUDA only (running on cpu)"
    return None


# ---- model and techniques (run inside the child process) ----


def build_model(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-init model straight on `device` in `dtype`: no checkpoint, no host round trip.

    Args:
        config: LlamaConfig kwargs, spelled as in the hub's config.json.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval()


def apply_2of4(model: torch.nn.Module) -> torch.nn.Module:
    """compress's 2:4 magnitude pruning of every Linear but lm_head, stored as semi-structured sparse tensors.
    The bench times those kernels, so where they cannot run (or refuse a layer) it skips instead of timing dense zeros."""
    reason = sparse_kernel_support(model)  # checked first: pruning an fp32 model on CPU only to skip is waste
    if reason:
        raise Skip(f"2:4 sparse kernels: {reason}")
    model = apply_prune(model, method="2of4", kernels=True)
    kernels = model.compression_facts["sparse_kernels"]
    if "dense:" in kernels:
        raise Skip(f"2:4 sparse kernels {kernels}")
    return model


def quant_spec(bits: int, dtype: torch.dtype) -> dict:
    """compress.quantization_config settings: LLM.int8 (default threshold), or NF4 computing in the model dtype."""
    if bits == 8:
        return {"method": "bnb", "bits": 8}
    return {"method": "bnb", "bits": 4, "quant_type": "nf4", "compute_dtype": str(dtype).removeprefix("torch."), "double_quant": False}


def apply_quant(model: torch.nn.Module, quant_kwargs: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Reload through a temporary checkpoint with compress's from_pretrained kwargs (quantization_config,
    device_map): bitsandbytes quantizes while loading, so the random weights make one trip to disk."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **quant_kwargs)
    return quantized.eval()


# ---- measurement ----


def time_generate(model: torch.nn.Module, input_ids: torch.Tensor, gen_kwargs: dict, latency: LatencyTracker, timer: TokenTimer) -> dict:
    """One timed generate call. Returns latency, TTFT, decode seconds per step and new tokens per sequence."""
    from transformers import LogitsProcessorList

    with latency.track():
        timer.reset()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), logits_processor=LogitsProcessorList([timer]), **gen_kwargs)
    return {"latency_s": latency.values[-1], "ttft_s": timer.ttft(), "tpot_s": timer.tpot(),
            "generated_tokens": out.shape[1] - input_ids.shape[1]}  # out: [B, S + new]


def peak_memory(memory: MemoryTracker, device: str) -> dict:
    """The tracker's peaks under this JSON's names: CUDA allocator peaks on GPU, peak RSS on CPU."""
    peaks = memory.get_memory()
    if device == "cuda":
        return {"peak_allocated_mb": peaks.max_allocated_mb, "peak_reserved_mb": peaks.max_reserved_mb}
    if not memory.rss_reset:
        log.warning("could not reset VmHWM; peak RSS covers the whole process")
    return {"peak_rss_mb": peaks.peak_rss_mb}


def bench(model: torch.nn.Module, batch: int, gen_kwargs: dict, args: argparse.Namespace, device: str, warmup: int) -> dict:
    """Warm up, then time `args.iters` generate calls at one batch size; mean and p50 of each number."""
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)  # [B, S]
    warm, latency, memory, timer = LatencyTracker(device), LatencyTracker(device), MemoryTracker(device), TokenTimer(device)
    for _ in range(warmup):
        time_generate(model, input_ids, gen_kwargs, warm, timer)
    first_run_s = warm.values[0] if warm.values else None  # includes compilation where there is one
    with memory.track():
        runs = [time_generate(model, input_ids, gen_kwargs, latency, timer) for _ in range(args.iters)]
    generated = {r["generated_tokens"] for r in runs}
    if generated != {args.new_tokens}:
        raise RuntimeError(f"generated {generated} tokens, expected exactly {args.new_tokens}")
    series = {  # one timer stamp per new token, so tpot is the mean over the new_tokens - 1 decode steps
        "latency_s": [r["latency_s"] for r in runs],
        "ttft_s": [r["ttft_s"] for r in runs],
        "decode_tokens_per_s": [batch / r["tpot_s"] for r in runs],
        "e2e_tokens_per_s": [batch * args.new_tokens / r["latency_s"] for r in runs],
    }
    result = {"batch_size": batch, "generated_tokens": args.new_tokens, "first_run_s": first_run_s}
    for key, values in series.items():
        result[f"{key}_mean"], result[f"{key}_p50"] = statistics.fmean(values), statistics.median(values)
    return result | peak_memory(memory, device) | {"weight_bytes": weight_bytes(model)}


def run_one(technique: str, args: argparse.Namespace) -> dict:
    """Build the model, apply one technique and benchmark it (child process side)."""
    from transformers import CompileConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = load_configs()[args.config]
    bits = QUANT_BITS.get(technique)
    quant_kwargs = quantization_config(quant_spec(bits, dtype), device) if bits else {}  # a missing bitsandbytes skips before the build
    model = build_model(config, device, dtype)
    n = args.new_tokens
    gen = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "use_cache": True,
           "eos_token_id": config["eos_token_id"], "pad_token_id": config["eos_token_id"]}
    warmup = args.warmup
    if technique == "baseline":
        gen["use_cache"] = False
    elif technique == "static_compile":
        # generate() compiles the decode forward itself once the cache is static (prefill stays eager)
        compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead")
        if device == "cpu":  # generate() only auto-compiles on accelerators unless told otherwise
            compile_config._compile_all_devices = True
        gen |= {"cache_implementation": "static", "compile_config": compile_config}
        warmup = max(warmup, 2)  # run 1 compiles, run 2 records the CUDA graphs
    elif technique == "prune_2of4":
        model = apply_2of4(model)
    elif bits:
        model = apply_quant(model, quant_kwargs, dtype)
    if device == "cuda":  # the timed peaks start from this model, not from cached blocks the transform freed
        torch.cuda.empty_cache()
    log.info("%s: %.1f MB of weights on %s", technique, weight_bytes(model) / 2**20, device)

    if technique == "batched":
        return {f"batch_{b}": bench(model, b, gen, args, device, warmup) for b in args.batch_sizes}
    result = bench(model, 1, gen, args, device, warmup)
    if technique == "static_compile":
        result["compiled"] = hasattr(model, "_compiled_call")
        result["compile_s"] = result["first_run_s"] - result["latency_s_p50"]
    return result


def run_child(technique: str, args: argparse.Namespace) -> dict:
    """Run one technique in a fresh interpreter; its stderr streams through, its result comes back as a JSON line."""
    reason = skip_reason(technique)
    if reason:
        return {"skipped": reason}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", technique, "--config", args.config, "--warmup", str(args.warmup),
           "--iters", str(args.iters), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=TECHNIQUE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {TECHNIQUE_TIMEOUT_S} s"}
    log.info("%s finished in %.1f s", technique, time.perf_counter() - start)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        return {"skipped": f"subprocess exited with code {proc.returncode} and no result (see its log above)"}
    return json.loads(lines[-1][len(RESULT_TAG):])


def child_main(technique: str, args: argparse.Namespace) -> None:
    try:
        result = run_one(technique, args)
    except Skip as err:  # compress: no 2:4 kernels here, bitsandbytes missing
        log.warning("%s skipped: %s", technique, err)
        result = {"skipped": str(err)}
    except Exception as err:  # OOM, unsupported kernel...: record it, let the other techniques run
        log.exception("%s failed", technique)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        result = {"skipped": f"{type(err).__name__}: {first}"}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---- report ----


def environment(args: argparse.Namespace) -> dict:
    """Card, bandwidth used for the roofline, versions and run settings."""
    if torch.cuda.is_available():
        card, device = torch.cuda.get_device_name(0), "cuda"
        match = card_bandwidth(card)
        bandwidth, source = (match[1], f"table: {match[0]}") if match else (None, f"unknown card {card!r}: add it to CARD_BANDWIDTH")
    else:
        card, device = "cpu", "cpu"
        given = args.cpu_bandwidth_gbs
        bandwidth, source = (given * 1e9, "--cpu-bandwidth-gbs") if given else (None, "cpu: pass --cpu-bandwidth-gbs for a roofline")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"card": card, "cpu": platform.processor() or platform.machine(), "device": device, "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_source": source, "versions": versions, "config_name": args.config, "config": load_configs()[args.config],
            "dtype": "bfloat16" if device == "cuda" else "float32", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "warmup": args.warmup, "iters": args.iters, "batch_sizes": args.batch_sizes}


def rows(results: dict) -> list[tuple[str, dict]]:
    """(label, numbers) per table row: one per technique, one per batch size for `batched`."""
    out = []
    for name, result in results.items():
        if "skipped" in result or "batch_size" in result:
            out.append((name, result))
        else:
            out.extend((f"{name} b={r['batch_size']}", r) for r in result.values())
    return out


def add_roofline(results: dict, bandwidth: float | None) -> None:
    """Share of the bandwidth roofline at batch 1: each decode token streams every weight byte once."""
    for _, row in rows(results):
        if row.get("batch_size") == 1:
            row["roofline_share"] = row["decode_tokens_per_s_p50"] * row["weight_bytes"] / bandwidth if bandwidth else None


def markdown_table(report: dict) -> str:
    lines = ["| technique | TTFT p50 ms | decode tok/s p50 | latency p50 s | peak MB | weights MB | roofline | note |", "|" + "---|" * 8]
    for label, r in rows(report["techniques"]):
        if "skipped" in r:
            lines.append(f"| {label} | | | | | | | skipped: {r['skipped']} |")
            continue
        peak = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
        roof = f"{r['roofline_share']:.1%}" if r.get("roofline_share") is not None else ""
        note = f"compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        lines.append(f"| {label} | {r['ttft_s_p50'] * 1e3:.1f} | {r['decode_tokens_per_s_p50']:.1f} | {r['latency_s_p50']:.3f} | {peak:.0f} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {roof} | {note} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    configs = list(load_configs())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-3.2-1b", choices=configs)
    p.add_argument("--techniques", default=",".join(TECHNIQUES), help=f"comma-separated subset of {','.join(TECHNIQUES)}")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="directory for <card-slug>.json")
    p.add_argument("--warmup", type=int, default=2, help="untimed generate calls before timing")
    p.add_argument("--iters", type=int, default=5, help="timed generate calls")
    p.add_argument("--prompt-len", type=int, default=60, help="random prompt tokens (our headline prompts are ~60)")
    p.add_argument("--new-tokens", type=int, default=24, help="fixed output length: min_new_tokens = max_new_tokens")
    p.add_argument("--batch-sizes", default="1,8,32,128", help="batch sizes of the `batched` technique")
    p.add_argument("--cpu-bandwidth-gbs", type=float, default=None, help="memory bandwidth for the CPU roofline, GB/s")
    p.add_argument("--one", choices=TECHNIQUES, help=argparse.SUPPRESS)  # internal: child process mode
    args = p.parse_args(argv)
    args.techniques = [t for t in args.techniques.split(",") if t]
    unknown = sorted(set(args.techniques) - set(TECHNIQUES))
    if unknown:
        p.error(f"unknown technique(s) {unknown}; choose from {','.join(TECHNIQUES)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.new_tokens < 2 or args.iters < 1:
        p.error("need --new-tokens >= 2 (decode speed needs a step after prefill) and --iters >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.one:
        child_main(args.one, args)
        return
    report = environment(args)
    log.info("%s on %s (%s), bandwidth %s", args.config, report["card"], report["dtype"], report["bandwidth_source"])
    results = {}
    for technique in args.techniques:
        log.info("running %s", technique)
        results[technique] = run_child(technique, args)
    add_roofline(results, report["bandwidth_bytes_per_s"])
    report["techniques"] = results
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{slug(report['card'])}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", path)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
