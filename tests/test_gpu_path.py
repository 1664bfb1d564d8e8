"""The GPU path, checked on a CPU: recorded failures, tp_size choice, the draft length in effect, layer-by-layer 2:4
pruning, a fixed chat-template date, the device error, hub pinning without a copy, the bandwidth share, and a
random-weight model through the whole pipeline (scripts/gpu-check with tiny configs)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_generate import BASE_PARAMS, ROWS

from conftest import ROOT, make_tiny_llama, stage, use_models_dir
from headline_bench import errors, files
from headline_bench.backends import transformers as hf_engine
from headline_bench.backends.transformers import hf_generate
from headline_bench.errors import InputError
from headline_bench.measure.roofline import bandwidth_share, card_bandwidth, kv_bytes_per_token
from headline_bench.models import convert as models
from headline_bench.models import ref
from headline_bench.settings import ModelEntry, Parallel, Prune, Speculative, check, parse
from headline_bench.techniques import config as techniques
from headline_bench.techniques import prune as compress
from headline_bench.techniques import tensor_parallel as tp


def stage_dir(tmp_path: Path, models_dir: Path, params: dict[str, Any]) -> Path:
    """A folder laid out like the repo for running generate.main() in-process."""
    work = tmp_path / "work"
    (work / "data" / "prepared").mkdir(parents=True)
    files.write_jsonl(work / "data" / "prepared" / "timed.jsonl", ROWS)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def test_a_technique_that_raises_is_a_recorded_failure(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = stage_dir(tmp_path, models_dir, copy.deepcopy(BASE_PARAMS))
    monkeypatch.chdir(work)

    def out_of_memory(*_: Any, **__: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(hf_engine, "setup", out_of_memory)
    monkeypatch.setattr(sys, "argv", ["generate.py", "kv_cache"])
    stage("generate").main()  # no earlier good outputs: recorded, no SystemExit, so that DVC runs the other techniques
    perf = json.loads(Path("metrics/techniques/kv_cache/perf.json").read_text())
    assert perf["failed"].startswith("OutOfMemoryError: CUDA out of memory")
    assert any("out_of_memory" in line for line in perf["traceback"]) and perf["config"]["name"] == "kv_cache"
    assert Path("data/generations/kv_cache.jsonl").read_text() == ""
    from headline_bench.analysis.rows import headline

    row = headline("kv_cache", perf, {"technique": "kv_cache", "failed": perf["failed"]})
    assert row["failed"] == perf["failed"] and row["skipped"].startswith("FAILED: OutOfMemoryError")


@pytest.mark.parametrize(("heads", "kv", "gpus", "device", "size"), [
    (32, 8, 1, "cuda", 1), (32, 8, 2, "cuda", 2), (32, 8, 4, "cuda", 4), (32, 8, 8, "cuda", 8), (32, 8, 3, "cuda", 2),
    (9, 3, 8, "cuda", 3), (9, 3, 2, "cuda", 1), (9, 3, 0, "cpu", 3), (4, 2, 0, "cpu", 2), (32, 8, 0, "cpu", 2), (5, 5, 0, "cpu", 5),
])
def test_tp_size_auto_divides_both_head_counts(heads: int, kv: int, gpus: int, device: str, size: int) -> None:
    assert tp.choose_size(heads, kv, gpus, device) == size


def test_tp_auto_is_settled_and_a_single_gpu_is_a_skip(models_dir: Path) -> None:
    cfg = techniques.resolve(parse({**BASE_PARAMS, "techniques": {"tp": {"parallel": {"tp_size": "auto"}}}}), "tp")
    settled = tp.settle_size(cfg, "cpu", json.loads((models_dir / "tiny" / "config.json").read_text()))
    assert settled.record()["parallel"] == {"tp_size": 2, "tp_size_setting": "auto"}  # tiny: 4 heads, 2 KV heads
    one = cfg.model_copy(update={"parallel": Parallel(tp_size=1)})
    with pytest.raises(errors.Skip, match="no tp_size >= 2"):
        techniques.check_hardware(one, "cpu")
    with pytest.raises(InputError, match="settled"):
        cfg.tp_size  # noqa: B018


def test_draft_length_is_set_where_transformers_reads_it(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    draft = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    used = hf_engine.configure_draft(draft, Speculative(num_assistant_tokens=3, assistant_confidence_threshold=0.0))
    assert used == {"num_assistant_tokens": 3, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
    seen: list[tuple[int, Any]] = []
    build = target._get_candidate_generator

    def spy(*args: Any, **kwargs: Any) -> Any:
        generator = build(*args, **kwargs)
        get = generator.get_candidates

        def get_candidates(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
            candidates, logits = get(input_ids, *a, **kw)
            seen.append((candidates.shape[1] - input_ids.shape[1], generator.num_assistant_tokens))
            return candidates, logits

        generator.get_candidates = get_candidates
        return generator

    target._get_candidate_generator = spy
    hf_generate(target, tok, ["the council votes on the budget"], "cpu", per_token=False, max_new_tokens=12, min_new_tokens=12,
                assistant_model=draft, num_assistant_tokens=20)  # the target-side kwarg transformers ignores
    assert seen and all(n == 3 for _, n in seen)
    assert max(k for k, _ in seen) == 3  # the same twin draft never stops early: every step drafts exactly 3


def test_2of4_prunes_layer_by_layer_without_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.utils import prune

    def no_masks(*_: Any, **__: Any) -> None:
        raise AssertionError("2:4 must not keep weight_orig + mask for every layer at once")

    monkeypatch.setattr(prune, "custom_from_mask", no_masks)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    live_masks: list[int] = []
    real = compress.mask_2of4

    def counting(weight: torch.Tensor) -> torch.Tensor:
        live_masks.append(sum(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in model.modules()))
        return real(weight)

    monkeypatch.setattr(compress, "mask_2of4", counting)
    compress.apply_prune(model, Prune(method="2of4", kernels=False))
    assert live_masks == [0, 0]
    for layer in (model[0], model[2]):
        groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()
    assert model.compression_facts["sparse_kernels"] == "skipped: disabled (prune.kernels: false)"


def test_chat_template_date_is_fixed() -> None:
    from headline_bench.data.prompts import build_prompt

    class DatedTok:
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool, **kwargs: Any) -> str:
            from transformers.utils.chat_template_utils import render_jinja_template

            template = ('{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y %H:%M:%S.%f") %}{%- endif %}'
                        "Today Date: {{ date_string }}\n{{ messages[0]['content'] }}")
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
            return rendered[0]

    first = build_prompt("S.", "Headline: {summary}", [], chat=True, tokenizer=DatedTok(), date="26 Jul 2024")
    assert first == build_prompt("S.", "Headline: {summary}", [], chat=True, tokenizer=DatedTok(), date="26 Jul 2024")
    assert first.startswith("Today Date: 26 Jul 2024\n")
    assert build_prompt("S.", "Headline: {summary}", [], chat=True, tokenizer=DatedTok()) != first  # the clock, to the microsecond


def test_a_recipe_for_one_device_kind_is_a_skip_on_the_other(models_dir: Path) -> None:
    cfg = techniques.resolve(parse({**BASE_PARAMS, "techniques": {"fast": {"only_on": "cuda"}}}), "fast")
    with pytest.raises(errors.Skip, match="only_on: cuda .* this run is on cpu"):
        techniques.check_hardware(cfg, "cpu")
    techniques.check_hardware(cfg.model_copy(update={"only_on": "cpu"}), "cpu")


def test_cuda_device_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="base.device is 'cuda' but torch sees no CUDA GPU"):
        techniques.pick_device("cuda")
    assert check({"base": {"device": "gpu"}}) == ["base.device = 'gpu': String should match pattern '^(auto|cpu|cuda(:\\d+)?)$'"]  # the schema's rule
    assert techniques.pick_device("auto") == "cpu"


def test_hub_models_are_pinned_not_copied(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    class Api:
        def model_info(self, repo_id: str, revision: str | None = None) -> Any:
            return type("Info", (), {"sha": "0123abcd" * 5})()

    def snapshot(repo_id: str, revision: str | None = None, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, "revision": revision, **kwargs})
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    use_models_dir(monkeypatch, tmp_path)
    info = models.convert("hubby", ModelEntry(hub_id="org/model"), tmp_path / "hubby")
    assert sorted(p.name for p in (tmp_path / "hubby").iterdir()) == ["source.json"]  # no weights re-saved
    assert info["revision"] == "0123abcd" * 5 and info["params"] > 0
    assert ref.model_path("hubby") == tiny_llama
    assert calls[-1]["revision"] == "0123abcd" * 5 and calls[-1]["local_files_only"] is True


def test_bandwidth_share_formula() -> None:
    class Cfg:
        num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_size = 16, 32, 8, 64, 2048

    kv = kv_bytes_per_token(Cfg(), 2)
    assert kv == 2 * 16 * 8 * 64 * 2  # 32 KiB per token for Llama-3.2-1B in bf16
    share = bandwidth_share(2.47e9, kv, 100, 1, 0.002, 3350)
    assert share["achieved_bandwidth_gbs"] == pytest.approx((2.47e9 + kv * 100) / 0.002 / 1e9)
    assert share["bandwidth_share"] == pytest.approx(share["achieved_bandwidth_gbs"] / 3350)
    assert bandwidth_share(1e9, kv, 100, 1, None, 3350)["bandwidth_share"] is None
    assert card_bandwidth("NVIDIA H100 80GB HBM3") == ("H100 SXM", 3.35e12) and card_bandwidth("NVIDIA H200")[0] == "H200"
    assert card_bandwidth("Some Future GPU") is None


def tiny_config(path: Path, layers: int, vocab: int) -> Path:
    """A tiny Llama config.json whose vocabulary is larger than the borrowed tokenizer's, as Llama's is."""
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return path / "config.json"


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/gpu-check on the CPU: two passes over random-weight tiny models that share their builds."""
    tmp = tmp_path_factory.mktemp("gpucheck")
    tokenizer = make_tiny_llama(tmp / "tok")
    small, large = tiny_config(tmp / "small", 2, 600), tiny_config(tmp / "large", 3, 600)
    spec = {
        "common": {"base": {"dtype": "float32", "device": "auto"}, "prepare": {"n": 2},
                   "generate": {"max_new_tokens": 5, "warmup_runs": 1, "max_input_tokens": 1000},
                   "models": {"small-random": {"config": str(small), "tokenizer_from": "unused", "seed": 0},
                              "large-random": {"config": str(large), "tokenizer_from": "unused", "seed": 1}}},
        "passes": {"small": {"base": {"model": "small-random", "target": "large-random"},
                             "techniques": ["kv_cache", "baseline", "speculative", "vllm"], "row_caps": {"speculative": 1},
                             "solo_check": "kv_cache"},
                   "large": {"base": {"model": "large-random", "target": "large-random"}, "techniques": ["kv_cache", "baseline"]}},
    }
    (tmp / "passes.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "scripts" / "gpu-check"), "--passes", str(tmp / "passes.yaml"), "--out", str(tmp / "out")]
    # as on the lent machine: generation only, packed into one file; then scoring and reports from the unpacked copy
    device = cmd + ["--phase", "generate", "--work", str(tmp / "work"), "--tokenizer", str(tokenizer), "--budget-s", "900",  # a 2-core CPU
                    "--export", str(tmp / "back" / "work.tar.gz")]
    proc = subprocess.run(device, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp / "out").exists()  # nothing scored or reported on the device
    with tarfile.open(tmp / "back" / "work.tar.gz") as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    proc = subprocess.run(cmd + ["--phase", "report", "--work", str(tmp / "unpacked"), "--card", "cpu"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (tmp / "stdout.txt").write_text(proc.stdout)
    return tmp


def test_gpu_check_runs_the_pipeline_on_random_weights(gpu_check: Path) -> None:
    out = gpu_check / "out" / "cpu"
    small = json.loads((out / "small" / "summary.json").read_text())["techniques"]
    assert list(small) == ["kv_cache", "baseline", "speculative", "vllm"]
    run = json.loads((out / "small" / "run.json").read_text())
    assert run["order"] == ["kv_cache", "baseline", "speculative"] and "vLLM needs a CUDA GPU" in run["skips"]["vllm"]
    assert run["solo_check"]["shared_tpot_s_p50"] > 0 and run["solo_check"]["solo_tpot_s_p50"] > 0
    assert small["speculative"]["samples"] == 1  # its row cap
    kv = small["kv_cache"]
    assert kv["quality"] == "n/a (random weights)" and "rougeL" not in kv
    assert kv["fidelity"] == 1.0 and kv["fidelity_reference"] == "baseline"  # token ids equal the no-cache run's
    assert kv["new_tokens_mean"] == 5  # fixed output length
    assert kv["bandwidth_share"] > 0 and kv["peak_bandwidth_source"].startswith("measured") and kv["achieved_bandwidth_gbs"] > 0
    # bytes counted by hand from the tiny shapes (hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads of 16, vocab 600, tied, fp32)
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert kv["weight_mb"] * 2**20 == pytest.approx(4 * (600 * 64 + 2 * layer + 64), rel=1e-3)
    perf = json.loads((gpu_check / "work" / "small" / "metrics" / "techniques" / "kv_cache" / "perf.json").read_text())
    assert perf["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert perf["timing_lock"]["held_by_parent"] and perf["timing_lock_wait_s"] == 0  # the gpu check holds the lock for its worker
    step = kv["weight_mb"] * 2**20 + perf["kv_bytes_per_token"] * perf["mean_context_tokens"]
    assert kv["bytes_per_step_mb"] * 2**20 == pytest.approx(step)
    assert kv["achieved_bandwidth_gbs"] == pytest.approx(step / kv["tpot_s_p50"] / 1e9)
    assert small["speculative"]["speculative_used"]["num_assistant_tokens"] == 4
    assert "vLLM needs a CUDA GPU" in small["vllm"]["skipped"]
    report = (out / "small" / "report.md").read_text()
    assert "n/a (random weights)" in report and "Share of peak" in report and "MBU =" in report
    large = json.loads((out / "large" / "summary.json").read_text())["techniques"]
    assert large["kv_cache"]["fidelity"] == 1.0 and large["kv_cache"]["weight_mb"] > kv["weight_mb"]
    built = sorted(p.name for p in (gpu_check / "work" / "models").iterdir())
    assert built == ["large-random", "small-random"]  # built once, shared by both passes
    assert not list((gpu_check / "work" / "models" / "small-random").glob("*.safetensors"))  # built from the seed, never written
    shared = json.loads((gpu_check / "work" / "small" / "metrics" / "techniques" / "baseline" / "perf.json").read_text())["shared_process"]
    assert shared["shared"] and shared["techniques_before_in_process"] == 1
    assert "| small | kv_cache |" in (gpu_check / "stdout.txt").read_text()
