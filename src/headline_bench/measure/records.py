"""perf.json: one definition of every field a technique's performance record may hold, and the one way to build it.

The record is assembled from parts (the engine's load facts, the timed runner's numbers, the checkpoint's resume
facts, the bandwidth roofline, ...). `assemble` joins them so that a key given twice is an error, never a silent
overwrite, and checks every key against this definition (an undeclared key is an error too). JSON keys are the ones
perf.json has always had, so `dvc metrics diff` against earlier commits still lines up. Fields marked `row=True` are
copied as they are into the report's one-row-per-technique table (analysis/rows.py derives its key list from them).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Num = int | float


def kept(description: str) -> Any:
    """A field of the record (optional: each engine and outcome sets its own subset)."""
    return Field(None, description=description)


def row(description: str) -> Any:
    """A field that is also copied into the report's headline row."""
    return Field(None, description=description, json_schema_extra={"row": True})


class Record(BaseModel):
    """Common settings: unknown keys are errors, types are checked, nothing is coerced silently into another key."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), ser_json_inf_nan="constants")


def join(*parts: dict[str, Any]) -> dict[str, Any]:
    """The parts as one dict, in the order given; a key set by two parts raises ValueError (never a silent overwrite)."""
    out: dict[str, Any] = {}
    for part in parts:
        twice = sorted(set(part) & set(out))
        if twice:
            raise ValueError(f"key(s) set twice: {', '.join(twice)}")
        out.update(part)
    return out


def assemble(record: type[Record], *parts: dict[str, Any]) -> dict[str, Any]:
    """join() the parts and check the result against `record` (undeclared keys and wrong types raise).

    Returns the checked record as a plain dict: insertion order kept, only the keys that were set."""
    out = join(*parts)
    checked = record.model_validate(out).model_dump(exclude_unset=True)
    return {k: checked[k] for k in out}


def row_keys(record: type[Record]) -> tuple[str, ...]:
    """The fields of `record` marked row=True, in definition order."""
    return tuple(name for name, f in record.model_fields.items() if (f.json_schema_extra or {}).get("row"))


class Perf(Record):
    """metrics/techniques/<technique>/perf.json."""

    # what ran, where
    technique: str = Field(description="technique name (params.yaml techniques.<name>)")
    config: dict[str, Any] | None = kept("the technique's resolved config (techniques/config.resolve, machine choices settled)")
    env: dict[str, Any] | None = kept("environment.env_info(): host, CPU, device, library and engine versions, thread settings")
    device: str | None = row("torch device the technique ran on (cpu, cuda, cuda:N)")
    model: dict[str, Any] | None = kept("data/models/<name>/source.json: id, GGUF and sha256, or hub revision, or random seed")
    # outcomes other than a measurement
    skipped: str | None = kept("why this machine cannot run the technique (a recorded skip)")
    failed: str | None = kept("the exception that stopped the technique, in one line (a recorded failure)")
    traceback: list[str] | None = kept("the last lines of the failure's traceback")
    # the engine's load facts
    engine: str | None = kept("engine package and version, for engines other than transformers")
    path: str | None = kept("folder the model was loaded from")
    load_s: Num | None = row("seconds to load the model and apply the technique's transforms")
    random_weights: bool | None = kept("the model has seeded random weights (speed and memory only)")
    weight_mb: Num | None = row("bytes the weights hold (quantized storage and scales included), MiB; summed over tensor parallel ranks")
    weight_format: str | None = row("storage format of the weights where it is not the dtype (GGUF type)")
    dtype: str | None = row("dtype the model computes in (or the GGUF type)")
    gguf: str | None = kept("GGUF file llama.cpp ran: <package>/<file>")
    n_threads: int | None = kept("llama.cpp threads")
    n_ctx: int | None = kept("llama.cpp context length")
    vllm_settings: dict[str, Any] | None = kept("the vLLM engine arguments used")
    ttft_method: str | None = kept("how TTFT was measured where the engine gives no per-step hook")
    compile_mode: str | None = row("torch.compile mode of the decode step")
    speculative_used: dict[str, Any] | None = row("draft settings transformers actually read (num_assistant_tokens, ...)")
    universal_assisted: bool | None = kept("speculative decoding across two tokenizers")
    draft_weight_mb: Num | None = row("bytes the draft model's weights hold, MiB")
    prune_method: str | None = kept("pruning method")
    pruned_layers: int | None = kept("Linear layers pruned")
    sparsity_overall: Num | None = row("share of zeros over the pruned layers")
    sparsity_per_layer: dict[str, Num] | None = kept("share of zeros per pruned layer")
    sparsity_all_params: Num | None = row("share of zeros over every parameter")
    sparsity_layers: str | None = row("which layers the sparsity covers")
    lm_head_pruned: bool | None = kept("lm_head was pruned")
    lm_head_tied: bool | None = kept("lm_head is tied to the input embedding")
    sparse_kernels: str | None = row("2:4 semi-structured kernels: applied, skipped (why) or none")
    prune_s: Num | None = kept("seconds spent pruning")
    prune_peak_rss_mb: Num | None = kept("peak RSS while pruning, MiB")
    # the timed run (measure/runner.py)
    samples: int | None = row("rows generated (prompts kept)")
    rows_too_long: int | None = kept("rows set aside: prompt over the model's limit")
    warmup_runs: int | None = kept("untimed calls before the first timed pass")
    latency_s_mean: Num | None = row("mean per-row latency over rows x passes, s")
    latency_s_p50: Num | None = row("median per-row latency, s")
    latency_s_p90: Num | None = row("90th percentile per-row latency, s")
    latency_s_p99: Num | None = row("99th percentile per-row latency, s (the report shows the maximum below 100 samples)")
    latency_s_stdev: Num | None = kept("standard deviation of per-row latency, s")
    latency_s_max: Num | None = row("maximum per-row latency, s")
    latency_count: int | None = row("latency samples (rows x timed passes)")
    ttft_s_mean: Num | None = kept("mean time to first token, s")
    ttft_s_p50: Num | None = row("median time to first token, s")
    ttft_s_p90: Num | None = kept("90th percentile time to first token, s")
    ttft_s_p99: Num | None = kept("99th percentile time to first token, s")
    ttft_s_stdev: Num | None = kept("standard deviation of time to first token, s")
    ttft_s_max: Num | None = kept("maximum time to first token, s")
    ttft_count: int | None = kept("time-to-first-token samples")
    tpot_s_mean: Num | None = kept("mean time per output token after the first, s")
    tpot_s_p50: Num | None = row("median time per output token after the first, s")
    tpot_s_p90: Num | None = kept("90th percentile time per output token, s")
    tpot_s_p99: Num | None = kept("99th percentile time per output token, s")
    tpot_s_stdev: Num | None = kept("standard deviation of time per output token, s")
    tpot_s_max: Num | None = kept("maximum time per output token, s")
    tpot_count: int | None = kept("time-per-output-token samples")
    samples_per_s: Num | None = row("rows per second of generate time")
    tokens_per_s: Num | None = row("new tokens per second of generate time")
    new_tokens_mean: Num | None = row("mean new tokens per row")
    wall_s: Num | None = kept("wall time of the timed passes of this session, s")
    warmup_s: list[Num] | None = kept("seconds of each warm-up call")
    graphs_compiled_before_timing: int | None = kept("torch.compile graphs built before the timed run")
    recompiles_in_timed_run: int | None = row("graphs compiled during the timed run (> 0: it paid for compiling)")
    cudagraph_skips_in_timed_run: int | None = row("compiled graphs inductor ran without CUDA graphs during the timed run (0 expected)")
    inductor_options: dict[str, Any] | None = kept("inductor options of the compile: process-wide ones away from their default, "
                                                   "with the ones passed to torch.compile (its mode's) on top")
    energy_j: Num | None = kept("GPU energy of this session's timed run, J (NVML)")
    energy_source: str | None = row("where the energy number comes from, or why it is n/a")
    energy_j_per_headline: Num | None = row("energy_j / rows this session generated")
    energy_j_per_token: Num | None = row("energy_j / new tokens this session generated")
    energy_scope: str | None = row("the rows and tokens the energy is divided by (this session's only)")
    peak_rss_mb: Num | None = kept("peak resident set size of the process during the timed run, MiB (CPU)")
    max_allocated_mb: Num | None = kept("CUDA allocator peak during the timed run, MiB, summed over GPUs")
    max_reserved_mb: Num | None = kept("CUDA allocator reserved peak during the timed run, MiB")
    rss_reset: bool | None = row("the peak RSS counter was reset before the run (else an earlier peak may show)")
    device_used_mb: Num | None = row("NVML memory in use on the GPU(s) after the run, every process (engines in another process)")
    memory_note: str | None = row("what the memory number means where torch's counters cannot see it")
    repeats: int | None = row("timed passes over every row")
    started_at: str | None = kept("when the timed run started (the order techniques ran in)")
    passes: list[dict[str, Any]] | None = kept("each timed pass's headline numbers")
    processes: list[dict[str, Any]] | None = kept("each fresh timed process (generate.processes): pid, times, warm-up, memory, numbers, per-row latency_s")
    process_count: int | None = row("fresh timed processes merged into these numbers")
    process: int | None = kept("which timed process this record came from (before merging)")
    untied_embedding_bytes: int | None = kept("input embedding bytes a decode step does not read (untied embedding; MBU leaves them out)")
    embedding_row_bytes: int | None = kept("bytes of one embedding row (what a decode step reads of the embedding, per sequence)")
    timing_gap_max: Num | None = row("largest |latency - (TTFT + (n-1) x TPOT)| / latency over the timed calls")
    timing_check: str | None = row("ok when every call's TTFT + (n-1) x TPOT is within 2% of its end-to-end latency")
    decode_loop: dict[str, Any] | None = kept("the compiled decode loop's settings, compile mode and compiled cache shapes")
    shared_process: dict[str, Any] | None = kept("GPU check: the worker process this technique shared with others (pid, techniques before it, row cap)")
    pid: int | None = kept("the timed process's pid (before merging)")
    finished_at: str | None = kept("when the timed process finished (before merging)")
    row_ids: list[Any] | None = kept("the timed rows, in order")
    token_ids_differ_across_processes: list[Any] | None = kept("rows whose generated token ids differ between timed processes")
    tokens_per_s_spread: Num | None = row("run-to-run spread of tokens/s: (max - min) / mean over passes")
    latency_s_mean_spread: Num | None = row("run-to-run spread of mean latency over passes")
    acceptance_rate: Num | None = row("accepted / proposed draft tokens over the timed rows (assisted decoding)")
    draft_tokens_proposed: int | None = kept("draft tokens proposed in the timed rows")
    draft_tokens_accepted: int | None = kept("draft tokens accepted in the timed rows")
    compile_s: Num | None = row("first warm-up call minus the same prompts' timed call: compile time, s")
    resume: dict[str, Any] | None = kept("checkpoints.Checkpoint.facts(): sessions, resumed rows, each session's environment")
    timing_lock: dict[str, Any] | None = kept("timing_lock.TimingLock.facts(): the machine-wide lock file, the wait and whom it waited for")
    timing_lock_wait_s: Num | None = kept("seconds the timed section waited for another one on this machine (summed over timed processes)")
    quality: str | None = row("why quality is not scored (random weights)")
    # tensor parallel
    tp_size: int | None = row("tensor parallel ranks")
    tp_backend: str | None = kept("torch.distributed backend of the ranks")
    peak_rss_mb_per_rank: list[Num] | None = kept("peak RSS of each rank, MiB")
    max_allocated_mb_per_rank: list[Num] | None = kept("CUDA allocator peak of each rank, MiB")
    max_reserved_mb_per_rank: list[Num] | None = kept("CUDA allocator reserved peak of each rank, MiB")
    weight_mb_per_rank: list[Num] | None = kept("weight bytes of each rank's shard, MiB")
    # bandwidth roofline (measure/roofline.py)
    peak_bandwidth_gbs: Num | None = row("the machine's peak memory bandwidth, GB/s")
    peak_bandwidth_source: str | None = row("datasheet or measured, and how")
    kv_bytes_per_token: Num | None = kept("KV-cache bytes one token of context holds")
    mean_context_tokens: Num | None = kept("mean tokens in the cache during decode")
    bytes_per_step_mb: Num | None = row("bytes one decode step reads, MiB")
    achieved_bandwidth_gbs: Num | None = row("bytes per step / TPOT, GB/s")
    bandwidth_share: Num | None = row("achieved / peak bandwidth (MBU)")
    bandwidth_note: str | None = kept("why the share is n/a")
    bandwidth_formula: str | None = kept("roofline.MBU_FORMULA")
