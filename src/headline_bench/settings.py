"""The one schema of params.yaml, checked before any stage does work."""

from __future__ import annotations

import codecs
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from headline_bench.errors import InputError, fail
from headline_bench.files import PARAMS

PosInt = Annotated[int, Field(ge=1)]


NonNegInt = Annotated[int, Field(ge=0)]


Share = Annotated[float, Field(ge=0, le=1)]


PosFloat = Annotated[float, Field(gt=0)]


NAME = r"^[A-Za-z0-9_]+$"  # technique and serving entry names: each is a path component of its outputs


# what a technique's `reference` may name: the techniques whose generations and quality files dvc.yaml declares as
# deps of every score stage (score reads its reference's files; an undeclared one would leave the score stale while
# `dvc status` is clean). Naming another technique means declaring its files there too (tests/test_deps.py checks).
REFERENCES = ("baseline", "target_only")


ENGINES = ("transformers", "llama_cpp", "vllm")  # backends/<engine>.py; `engine:` of techniques and serving entries


Engine = Literal[ENGINES]  # type: ignore[valid-type]


DType = Literal["float32", "float16", "bfloat16"]


Column = str | NonNegInt  # a name, or a position with prepare.header: none


class Section(BaseModel):
    """Unknown keys are errors (a typo is never ignored); YAML types are taken as they are (no "5" -> 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Base(Section):
    seed: int = 0
    model: str | None = None
    target: str | None = None
    dtype: DType = "float32"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"


class Prepare(Section):
    source: str
    split: str = "train"
    summary_column: Column = "summary"
    headline_column: Column = "headline"
    id_column: Column | None = None
    n: PosInt                # rows in the quality set (generated once per lossy technique and scored)
    timed_rows: PosInt = 12  # the first rows of the quality set, timed in every technique's processes
    shuffle: bool = False
    encoding: str = "utf-8"
    dedupe: bool = False
    header: Literal["first_row", "none"] = "first_row"

    @field_validator("encoding")
    @classmethod
    def known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None
        return value

    @model_validator(mode="after")
    def positions_need_no_header(self) -> Prepare:
        for key in ("summary_column", "headline_column", "id_column"):
            if isinstance(getattr(self, key), int) and self.header != "none":
                raise ValueError(f"{key} is a position ({getattr(self, key)}); positions need prepare.header: none")
        return self


class ModelEntry(Section):
    """One of: a packaged GGUF (gguf_package), a hub id, a local folder, or random weights from a config."""

    id: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_assemble: bool = False
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    hub_id: str | None = None
    revision: str | None = None
    path: str | None = None
    config: str | None = None
    tokenizer_from: str | None = None
    seed: int = 0  # random weights: the seed they are drawn with
    dtype: DType | None = None  # random weights: the dtype they are saved in (default: the config's)

    @model_validator(mode="after")
    def one_source(self) -> ModelEntry:
        given = [k for k in ("gguf_package", "hub_id", "path", "config") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of gguf_package, hub_id, path, config (got {given or 'none'})")
        if self.gguf_package and not (self.gguf_file or self.gguf_assemble):
            raise ValueError("a gguf_package needs gguf_file or gguf_assemble: true")
        return self


class FewShot(Section):
    summary: str
    headline: str


class Prompt(Section):
    template: str
    few_shot: list[FewShot] = []
    date: str | None = None  # the date chat templates print (date_string)

    @field_validator("template")
    @classmethod
    def has_summary_field(cls, value: str) -> str:
        try:
            value.format(summary="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"must be text with one {{summary}} field and no other braces ({type(e).__name__}: {e})") from None
        if "{summary}" not in value:
            raise ValueError("must contain {summary}")
        return value


class Generate(Section):
    max_new_tokens: PosInt
    use_cache: bool = True
    batch_size: PosInt = 1
    warmup_runs: NonNegInt = 1
    max_input_tokens: PosInt = 512
    repeats: PosInt = 1             # timed passes over the timed rows in each timed process
    processes: PosInt = 1           # timed processes per technique (1: the stage's own; more: fresh ones, process-to-process variance)
    quality_batch_size: PosInt = 8  # prompts per call in the untimed quality pass, where the technique can batch
    check_rows: NonNegInt = 22     # untimed rows after the timed ones on which lossless techniques and their references are checked


class Score(Section):
    bootstrap_samples: PosInt = 1000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95  # family-wise: each of k intervals is at 1 - (1 - confidence) / k
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.01  # absolute ROUGE-L difference (one ROUGE point)
    min_rows: Annotated[int, Field(ge=2)] = 30  # below this no quality state is given ("too few rows")
    power: Annotated[float, Field(gt=0, lt=1)] = 0.8  # of rows_to_decide
    family: list[str] = []  # lossy techniques compared with baseline: one family, fixed by params (not by what ran)
    model_comparisons: list[str] = []  # other models compared with baseline (target_only): a family of their own
    seed: int | None = None
    near_tie_units: Annotated[float, Field(ge=0)] = 4  # fallback near-tie threshold in machine epsilons, where no calibration exists
    near_tie_alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01  # calibration: chance that numeric noise alone calls a row "real" in a whole lossless check
    near_tie_calibration: str | None = "calibration/near_tie.json"  # measured thresholds per device/dtype (scripts/calibrate_near_tie.py)


class FidelityBounds(Section):  # quality/divergence.py: a technique is "within bound" when every interval is on the good side
    kl_mean: Annotated[float, Field(gt=0)]    # mean over rows of per-token KL(baseline || technique), nats
    kl_p99: Annotated[float, Field(gt=0)]     # 99th percentile of per-token KL over all positions, nats
    top1: Annotated[float, Field(gt=0, le=1)]  # least share of positions whose top token is baseline's
    nll_delta: Annotated[float, Field(gt=0)]  # most added NLL per token of the reference headline, nats


class Fidelity(Section):  # teacher-forced fidelity to baseline (stages fidelity_reference and fidelity)
    rows: PosInt = 100  # the first rows of baseline's quality pass
    min_rows: Annotated[int, Field(ge=2)] = 100  # below this no fidelity state (tests/test_fidelity_sim.py); its own, not score.min_rows
    top_k: PosInt = 1024  # baseline's distribution stored as its top-k log-probs, the rest lumped
    bounds: FidelityBounds
    decide: list[Literal["kl_mean", "kl_p99", "top1", "nll_delta"]] = ["kl_mean", "kl_p99"]  # the measures that make the state


class Report(Section):
    sample_headlines: NonNegInt = 3
    balanced_rougeL_within: Annotated[float, Field(ge=0)] = 0.01
    memory_tie_share: Annotated[float, Field(ge=0, lt=1)] = 0.02  # peak memories within this share of the lowest are tied
    speed_tie: Annotated[float, Field(gt=0, lt=1)] = 0.05  # "tied" only when the ms/token ratio's interval lies within 1 +/- this
    usd_per_hour: Annotated[float, Field(ge=0)] | None = None


class Quantize(Section):
    method: Literal["bnb", "torchao_int8", "torchao_int4"] = "bnb"
    bits: Literal[4, 8] = 8
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: DType | Literal["auto"] = "auto"
    double_quant: bool = False
    threshold: Annotated[float, Field(gt=0)] = 6.0
    group_size: Literal[32, 64, 128, 256] = 64
    include_lm_head: bool = True


class Prune(Section):
    method: Literal["l1_unstructured", "2of4"] = "l1_unstructured"
    amount: Share = 0.3
    include_lm_head: bool = False
    kernels: bool = True


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class Compile(Section):  # transformers' CompileConfig
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"
    mode: CompileMode | dict[Literal["cpu", "cuda"], CompileMode] = "reduce-overhead"  # a dict picks by device kind
    options: dict[str, Any] | None = None


class DecodeLoop(Section):  # backends/compiled_loop.py: the gpt-fast style loop on transformers' model + StaticCache
    mode: CompileMode | dict[Literal["cpu", "cuda"], CompileMode] = {"cpu": "default", "cuda": "reduce-overhead"}
    bucket: PosInt = 64  # cache slots: prompt + new tokens rounded up to a multiple of this (one compiled frame per bucket)
    # torch._inductor.config overrides for this loop's compile, sub-configs nested (cpp: {enable_concat_linear: true},
    # so `dvc exp run -S` paths stay plain): gpt-fast's coordinate_descent_tuning on CUDA; on CPU freezing (weights
    # become constants, int4 repacked once), cpp.enable_concat_linear (q/k/v and gate/up as one int4 matmul each, needs
    # freezing) and cpp_wrapper (the step launched from C++ instead of Python).
    inductor: dict[str, bool | int | str | dict[str, bool | int | str]] = {}
    # fused: the step's attention as arithmetic inductor fuses (backends/compiled_loop.step_attention); sdpa: the model's own
    attention: Literal["sdpa", "fused"] = "sdpa"
    module_guards: bool = False  # dynamo re-checks the model's modules before every step (~1.1 of ~10 ms on CPU); off: the loop never changes them
    # auto: the written-out Llama step (backends/fused_llama.py: fused q/k/v and gate/up, grouped-query attention without
    # copies) where the architecture has one; model: the model's own forward (the step before issue 29, for A/B runs)
    step: Literal["auto", "fused", "model"] = "auto"


class Speculative(Section):
    """Set on the draft's generation config (transformers reads them there); None: the draft's own value."""

    num_assistant_tokens: PosInt = 4
    num_assistant_tokens_schedule: Literal["constant", "heuristic", "heuristic_transient"] = "constant"  # constant: no drift from warm-up
    assistant_confidence_threshold: Share | None = None


class Parallel(Section):
    tp_size: PosInt | Literal["auto"] = 1


class SettledParallel(Parallel):
    """`tp_size: auto` as chosen for this model and machine (tensor_parallel.settle_size); never in params.yaml."""

    tp_size: PosInt
    tp_size_setting: Literal["auto"] = "auto"


class Vllm(BaseModel):
    """vLLM engine arguments (vllm.LLM keyword arguments): the ones used here typed, any other passed on as given."""

    model_config = ConfigDict(extra="allow", strict=True)
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_model_len: PosInt | None = None  # None: generate.max_input_tokens + max_new_tokens


class GenerateKwargs(BaseModel):
    """generate() arguments of a technique (and of the `generate` section's max_new_tokens / use_cache).

    The common GenerationConfig fields are typed here; any other key must be a GenerationConfig attribute or a
    generate() argument ("did you mean" for a typo) and, where transformers' default has a type, of that type.
    Unset keys are not passed: transformers' own defaults apply.
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    max_new_tokens: PosInt | None = None
    min_new_tokens: NonNegInt | None = None
    use_cache: bool | None = None
    do_sample: bool | None = None
    num_beams: PosInt | None = None
    cache_implementation: Literal["static", "offloaded_static", "dynamic", "offloaded", "quantized", "sliding_window", "hybrid"] | None = None
    max_cache_len: PosInt | None = None
    prompt_lookup_num_tokens: PosInt | None = None
    max_matching_ngram_size: PosInt | None = None
    repetition_penalty: PosFloat | None = None

    @model_validator(mode="after")
    def known_and_typed(self) -> GenerateKwargs:
        problems = [f"{k}: null is not allowed (leave it out for transformers' default)" for k in self.model_fields_set if getattr(self, k) is None]
        problems += [f"{k}: set by the harness ({HARNESS_KWARGS[k]}), not a setting" for k in sorted(self.set_keys() & HARNESS_KWARGS.keys())]
        for key, value in (self.model_extra or {}).items():
            if key in HARNESS_KWARGS:
                continue
            if key not in generate_kwarg_names():
                problems.append(unknown_kwarg(key))
            elif (wrong := mistyped(key, value)) is not None:
                problems.append(wrong)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def kwargs(self) -> dict[str, Any]:
        """The generate() keyword arguments: the keys that were set."""
        return self.model_dump(exclude_unset=True)

    def set_keys(self) -> set[str]:
        return set(self.model_fields_set) | set(self.model_extra or {})


# generate() arguments the harness passes itself (backends/transformers.py): a technique's value would be refused by
# generate() ("multiple values") or silently replaced, so the schema refuses it
HARNESS_KWARGS = {"do_sample": "greedy decoding: False", "pad_token_id": "the tokenizer's", "logits_processor": "the per-token timer",
                  "streamer": "the per-token timer reads every step", "eos_token_id": "the model's EOS and newline ids",
                  "tokenizer": "the technique's tokenizer", "inputs": "the prompts", "assistant_model": "speculative: sets it",
                  "assistant_tokenizer": "speculative: sets it", "compile_config": "compile: sets it"}


# the technique-level `generate` keys an engine or the compiled loop applies; any other would be silently ignored
APPLIED_GENERATE = {"llama_cpp": ("max_new_tokens",), "vllm": ("max_new_tokens",), "decode_loop": ("max_new_tokens", "min_new_tokens", "use_cache")}


class Technique(Section):
    role: Literal["model", "target"] = "model"
    engine: Engine = "transformers"
    generate: GenerateKwargs = GenerateKwargs()
    batch_size: PosInt | None = None
    reference: str | None = None
    dtype: DType | None = None
    threads: PosInt | None = None
    quantize: Quantize | None = None
    prune: Prune | None = None
    compile: Compile | None = None
    speculative: Speculative | None = None
    parallel: Parallel | None = None
    device_map: str | None = None
    max_memory: dict[str | int, str | int] | None = None
    only_on: Literal["cpu", "cuda"] | None = None
    enabled: bool = True  # false: a recorded skip (kept in params; `dvc exp run -S techniques.<name>.enabled=true` runs it)
    vllm: Vllm | None = None  # vLLM engine arguments
    decode_loop: DecodeLoop | None = None  # the compiled decode loop instead of generate() (compiled_loop)

    @model_validator(mode="after")
    def generate_keys_it_applies(self) -> Technique:
        runner = "decode_loop" if self.engine == "transformers" and self.decode_loop else self.engine
        applied = APPLIED_GENERATE.get(runner)
        ignored = sorted(self.generate.set_keys() - set(applied)) if applied is not None else []
        if ignored:
            raise ValueError(f"generate.{', generate.'.join(ignored)}: not applied by {'the compiled decode loop' if runner == 'decode_loop' else 'engine ' + runner} "
                             f"(it applies generate.{', generate.'.join(applied)})")
        return self


class SLO(Section):
    """A request is good when it meets both latency limits; a level passes when `share` of its requests are good."""

    ttft_s: PosFloat
    tpot_s: PosFloat
    share: Annotated[float, Field(gt=0, le=1)]
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95  # one-sided level of the Wilson bound that must clear `share`


class ServedQuality(Section):
    """The served quality pass (serving/served_quality.py): every quality row once, paired with the offline reference."""

    rows: PosInt | None = None  # the first quality rows served (None: all); paired with the offline pass on the same rows
    at_sustainable_rate: bool = False  # also serve every quality row once at the sustainable rate (does load change outputs?)
    max_duration_s: PosFloat = 1800  # no new quality request after this long (a bound, not a target: rows left out score 0)


class ClientCheck(Section):
    """When the load generator, not the server, sets the numbers (serving/client_check.py)."""

    calibrate: bool = True  # replay every level against a null server (instant, same token counts) for the client's own floor
    max_cpu_share: Share = 0.5  # client-bound: the client's CPU time over a level's wall time reaches this share of one core
    max_floor_share: Share = 0.1  # client-bound: the null-server P90 TTFT or TPOT reaches this share of the SLO limit


class Serve(Section):
    """Load settings shared by every serving entry (serving/run.measure)."""

    rates: Annotated[list[PosFloat], Field(min_length=1)]
    overload_share: Share = 0.5
    runs: PosInt = 2  # independent rate searches; the sustainable rate is the lowest, with the spread
    concurrency: list[PosInt] = []
    requests: PosInt = 10
    max_duration_s: PosFloat = 15
    timeout_s: PosFloat = 15
    warmup_requests: NonNegInt = 2
    search_steps: NonNegInt = 2
    search_min_gap: Annotated[float, Field(gt=0, lt=1)] = 0.15
    startup_timeout_s: PosFloat = 240
    slo: SLO
    quality: ServedQuality = ServedQuality()
    client: ClientCheck = ClientCheck()


class ContinuousBatching(Section):  # `transformers serve --cb-*` flags; None: the server's default
    block_size: PosInt | None = None
    num_blocks: PosInt | None = None
    max_batch_tokens: PosInt | None = None
    max_memory_percent: Annotated[float, Field(gt=0, le=1)] | None = None
    use_cuda_graph: bool | None = None


# the keys only one engine reads; the others are common to every engine
ENGINE_KEYS = {"transformers": ("continuous_batching", "compile", "cb"), "llama_cpp": ("server", "interrupt_requests", "parallel", "binary"),
               "vllm": ("args",)}


SERVER_FLAGS = ("--host", "--port", "--model", "--dtype", "--seed")  # what backends/vllm.py server() passes `vllm serve` itself


class ServingEntry(Section):
    """One engine under load, with its knobs (backends/<engine>.py server())."""

    engine: Engine
    enabled: bool = True  # false: a recorded skip (kept in params; `dvc exp run -S serving.<entry>.enabled=true` runs it)
    model: str | None = None  # None: base.model
    reference: str | None = None  # the technique whose offline headlines the served ones are compared to (dvc.yaml: a dep of serve)
    dtype: DType | None = None  # None: base.dtype
    threads: PosInt | None = None  # None: torch's thread count
    request: dict[str, Any] = {}  # extra request fields (engine-specific sampling knobs)
    quality_request: dict[str, Any] = {}  # extra fields of the served quality pass only, e.g. {logprobs: 2} where the server returns them
    continuous_batching: bool = False
    compile: bool = False
    cb: ContinuousBatching | None = None
    server: Literal["llama_cpp_python", "llama_server"] = "llama_cpp_python"
    interrupt_requests: bool = True  # llama-cpp-python's own default: a new request cuts the stream in progress
    parallel: PosInt = 1  # llama-server slots
    binary: str = "llama-server"
    args: list[str | int | float] = []  # extra `vllm serve` arguments

    @model_validator(mode="after")
    def keys_of_its_engine(self) -> ServingEntry:
        foreign = [k for e, keys in ENGINE_KEYS.items() if e != self.engine for k in keys if k in self.model_fields_set]
        if foreign:
            common = [k for k in type(self).model_fields if not any(k in keys for keys in ENGINE_KEYS.values())]
            raise ValueError(f"{', '.join(foreign)}: not a setting of engine {self.engine} (it takes: {', '.join(common + list(ENGINE_KEYS[self.engine]))})")
        if "reference" in self.model_fields_set and self.reference is None:  # dvc.yaml would depend on data/generations/None.jsonl
            raise ValueError("reference: null is not allowed (name the technique whose offline headlines the served ones are compared to)")
        harness = [str(a) for a in self.args if str(a).split("=")[0] in SERVER_FLAGS]
        if harness:
            raise ValueError(f"args: {', '.join(harness)}: set by the harness (the server listens on 127.0.0.1 only; model, port, dtype "
                             "and seed come from the entry)")
        return self


class Params(Section):
    base: Base = Base()
    prepare: Prepare | None = None
    models: dict[str, ModelEntry] = {}
    prompt: Prompt | None = None
    generate: Generate | None = None
    score: Score | None = None
    fidelity: Fidelity | None = None
    report: Report | None = None
    technique: str | None = None
    techniques: dict[str, Technique | None] = {}
    serve: Serve | None = None  # load settings of the serving work
    serving: dict[str, ServingEntry] = {}  # engine entries of the serving work

    @field_validator("techniques", "serving")
    @classmethod
    def names_are_path_components(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [n for n in value if not re.match(NAME, n)]
        if bad:
            raise ValueError(f"{', '.join(repr(n) for n in bad)}: names may hold only letters, digits and _ (each names output files)")
        return value

    @field_validator("models")
    @classmethod
    def model_names_are_folder_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [n for n in value if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", n)]
        if bad:
            raise ValueError(f"{', '.join(repr(n) for n in bad)}: names may hold only letters, digits, _, . and - (each is a folder under data/models)")
        return value

    @model_validator(mode="after")
    def names_exist(self) -> Params:
        names = sorted(self.techniques)
        if self.technique is not None and self.technique not in self.techniques:
            raise ValueError(f"technique: '{self.technique}' is not one of techniques ({', '.join(names)})")
        for name, entry in self.techniques.items():
            if entry and entry.reference and entry.reference not in self.techniques:
                raise ValueError(f"techniques.{name}.reference: '{entry.reference}' is not one of techniques ({', '.join(names)})")
            if entry and entry.reference and entry.reference not in REFERENCES:
                raise ValueError(f"techniques.{name}.reference: '{entry.reference}' is not one of {', '.join(REFERENCES)} (the references "
                                 "whose files dvc.yaml's score stage declares; settings.REFERENCES)")
        for name, serving in self.serving.items():
            if serving.reference and self.techniques and serving.reference not in self.techniques:
                raise ValueError(f"serving.{name}.reference: '{serving.reference}' is not one of techniques ({', '.join(names)})")
            if serving.model and self.models and serving.model not in self.models:
                raise ValueError(f"serving.{name}.model: '{serving.model}' is not defined under models ({', '.join(sorted(self.models))})")
        for role in ("model", "target"):
            name = getattr(self.base, role)
            if name and self.models and name not in self.models:
                raise ValueError(f"base.{role}: '{name}' is not defined under models ({', '.join(sorted(self.models))})")
        return self

    def entry(self, name: str) -> Technique:
        """The settings of technique `name` (a command-line argument, so an unknown one is an InputError)."""
        if name not in self.techniques:
            raise InputError(f"unknown technique '{name}'; params.yaml defines: {', '.join(sorted(self.techniques))}")
        return self.techniques[name] or Technique()


# generate()'s own arguments besides the GenerationConfig ones (its signature needs torch to import)
GENERATE_ARGS = frozenset({"inputs", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
                           "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "tokenizer", "assistant_tokenizer"})


@functools.cache
def generate_kwarg_names() -> frozenset[str]:
    """What a technique's `generate:` may hold: GenerationConfig attributes and generate()'s own arguments."""
    from transformers.generation.configuration_utils import GenerationConfig  # light: no torch, no models

    return frozenset(vars(GenerationConfig())) | GENERATE_ARGS


def unknown_kwarg(key: str) -> str:
    close = difflib.get_close_matches(key, generate_kwarg_names(), n=1)
    return f"unknown generate() argument '{key}'" + (f" (did you mean '{close[0]}'?)" if close else " (see transformers' GenerationConfig)")


@functools.cache
def generation_defaults() -> dict[str, Any]:
    """transformers' defaults for GenerationConfig fields that neither the model nor the user set (their types are
    the types a value must have); empty where this transformers has no such table (then names alone are checked)."""
    from transformers.generation.configuration_utils import GenerationConfig

    table = getattr(GenerationConfig, "_get_default_generation_params", None)
    return {k: v for k, v in (table() if table else vars(GenerationConfig())).items() if v is not None}


def mistyped(key: str, value: Any) -> str | None:
    """Why `value` cannot be generate() argument `key`, judged by the type of transformers' default; None if it can."""
    default = generation_defaults().get(key)
    if default is None:
        return None
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
    if kinds is None or (isinstance(value, kinds) and (isinstance(value, bool) == isinstance(default, bool))):
        return None
    return f"{key} = {value!r} should be {type(default).__name__} (transformers' default is {default!r})"


def _models_in(annotation: Any) -> list[Any]:
    """The BaseModel classes and container shapes inside a field's annotation (Optional, Union, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if origin in (dict, list):
        return [(origin, m) for m in _models_in(typing.get_args(annotation)[-1])]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at `loc` (the path of an unknown key, without the key) accepts."""
    shapes: list[Any] = [Params]
    for part in loc:
        model = next((s for s in shapes if isinstance(s, type) and part in s.model_fields), None)
        if model is None:  # a dict key or list index: step into the container's value type
            shapes = [m for s in shapes if isinstance(s, tuple) for m in [s[1]]]
            continue
        shapes = _models_in(model.model_fields[part].annotation)
    return next((sorted(s.model_fields) for s in shapes if isinstance(s, type)), [])


UNION_TAGS = re.compile(r"^(function-.*|constrained-.*|int|str|bool|float|literal\[.*\]|dict\[.*\]|list\[.*\])$")


def describe(error: dict[str, Any]) -> tuple[str, str]:
    """The dotted key (with its value) and what is wrong with it, for one pydantic error."""
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and UNION_TAGS.match(p) and p not in Params.model_fields))
    key = ".".join(str(p) for p in loc) or "params.yaml"
    if error["type"] == "extra_forbidden":
        return key, f"unknown key; allowed: {', '.join(allowed_keys(loc[:-1]))}"
    if error["type"] == "missing":
        return key, "missing (required)"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" = {value!r}"
    return key + shown, error["msg"].removeprefix("Value error, ").replace("Input should be ", "should be ", 1)


def problems_of(data: Any) -> tuple[Params | None, list[str]]:
    """The validated settings, or every problem in them, one line each."""
    if not isinstance(data, dict):
        return None, ["params.yaml: must be a mapping of sections"]
    try:
        return Params.model_validate(data), []
    except ValidationError as e:
        by_key: dict[str, list[str]] = {}
        for err in e.errors():  # a union gives one error per branch: one line per key
            key, msg = describe(err)
            by_key.setdefault(key, []).append(msg)
        return None, [(f"{key}: " if key != "params.yaml" else "") + " or ".join(dict.fromkeys(msgs)).replace(" or should be ", " or ") for key, msgs in by_key.items()]


def check(params: Any) -> list[str]:
    """Every problem in params.yaml, one line each; empty when it is valid."""
    return problems_of(params)[1]


def parse(data: Any) -> Params:
    """A params mapping (params.yaml as read) as typed settings; its problems, one per line, as an InputError."""
    params, problems = problems_of(data)
    if params is None:
        raise InputError("\n".join(problems))
    return params


class AliasError(yaml.YAMLError):
    """A YAML anchor or alias: refused before it is expanded (an alias bomb never grows)."""


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors (&a) and aliases (*a): params.yaml has no use for them, and a few
    nested aliases (a "billion laughs") expand to gigabytes in every consumer that resolves them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise AliasError(f"line {event.start_mark.line + 1}: YAML anchors and aliases are not allowed ({sign}{event.anchor}); write the values out")
        return super().compose_node(parent, index)


def read_yaml(text: str) -> Any:
    """YAML text as Python data, without anchors or aliases (NoAliasLoader)."""
    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def load_params(path: Path = PARAMS, required: Iterable[str] = ()) -> Params:
    """All of params.yaml as typed settings, checked against the one schema before any work is done.

    Every problem is logged as one `error:` line naming the key and what it allows, then the stage exits
    (no traceback). Stages pick the sections they declare in dvc.yaml; defaults come from the schema alone.

    Args:
        path: the params file.
        required: sections this stage reads; their absence is an error here rather than a failure later.
    """
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path}: not found (run the stage from the repository root)")
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    params, problems = problems_of(data)
    problems += [f"{section}: missing (this stage needs it)" for section in required if isinstance(data, dict) and data.get(section) is None]
    if problems or params is None:
        fail("\n".join(f"{path}: {p}" for p in problems))
    return params  # type: ignore[return-value]


def stage_key(stage: str, given: str | None) -> str:
    """The technique or serving entry a foreach stage runs: `given` (its command-line argument, run by hand), else the
    key in DVC_STAGE, which DVC sets for every stage command ("generate@<key>"). Refused unless it matches NAME.

    Why: DVC runs a stage's cmd through a shell, so a `${key}` in dvc.yaml's cmd would run a name such as
    `x;id>hb_pwned` before this schema could refuse it, and no quoting helps (a `'` in the name ends the quote)."""
    if given is None:
        addressing = os.environ.get("DVC_STAGE", "").rpartition(":")[2]  # "sub/dvc.yaml:generate@key" outside the root
        prefix, _, given = addressing.partition("@")
        if prefix != stage or not given:
            fail(f"usage: python stages/{stage}.py <name> (DVC gives the name in DVC_STAGE={stage}@<name>)")
    if not re.match(NAME, given):
        fail(f"{given!r}: names may hold only letters, digits and _ (each names output files)")
    return given
