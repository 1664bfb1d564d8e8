"""The one schema of params.yaml, checked before any stage does work."""

from __future__ import annotations

import codecs
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from headline_bench.errors import fail
from headline_bench.files import PARAMS

PosInt = Annotated[int, Field(ge=1)]


NonNegInt = Annotated[int, Field(ge=0)]


Share = Annotated[float, Field(ge=0, le=1)]


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
    n: PosInt
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
    seed: int | None = None
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
    repeats: PosInt = 1


class Score(Section):
    bootstrap_samples: PosInt = 1000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.01
    seed: int | None = None
    near_tie_units: Annotated[float, Field(ge=0)] = 4


class Report(Section):
    sample_headlines: NonNegInt = 3
    balanced_rougeL_within: Annotated[float, Field(ge=0)] = 0.01
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
    coordinate_descent_tuning: bool = False  # inductor's per-kernel launch tuning (gpt-fast turns it on)


class Speculative(Section):
    num_assistant_tokens: PosInt = 4
    num_assistant_tokens_schedule: Literal["constant", "heuristic", "heuristic_transient"] | None = None
    assistant_confidence_threshold: Share | None = None


class Parallel(Section):
    tp_size: PosInt | Literal["auto"] = 1


class Technique(Section):
    role: Literal["model", "target"] = "model"
    engine: Literal["transformers", "llama_cpp", "vllm"] = "transformers"
    generate: dict[str, Any] = {}
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
    vllm: dict[str, Any] | None = None  # vLLM engine arguments
    decode_loop: DecodeLoop | None = None  # the compiled decode loop instead of generate() (compiled_loop)

    @field_validator("generate")
    @classmethod
    def generate_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = [unknown_kwarg(k) for k in value if k not in generate_kwarg_names()]
        if problems:
            raise ValueError("; ".join(problems))
        return value


class Params(Section):
    base: Base = Base()
    prepare: Prepare | None = None
    models: dict[str, ModelEntry] = {}
    prompt: Prompt | None = None
    generate: Generate | None = None
    score: Score | None = None
    report: Report | None = None
    technique: str | None = None
    techniques: dict[str, Technique | None] = {}
    serve: dict[str, Any] | None = None    # load settings of the serving work (its keys are checked by that stage)
    serving: dict[str, Any] | None = None  # engine entries of the serving work

    @model_validator(mode="after")
    def names_exist(self) -> Params:
        names = sorted(self.techniques)
        if self.technique is not None and self.techniques and self.technique not in self.techniques:
            raise ValueError(f"technique: '{self.technique}' is not one of techniques ({', '.join(names)})")
        for name, entry in self.techniques.items():
            if entry and entry.reference and entry.reference not in self.techniques:
                raise ValueError(f"techniques.{name}.reference: '{entry.reference}' is not one of techniques ({', '.join(names)})")
        for role in ("model", "target"):
            name = getattr(self.base, role)
            if name and self.models and name not in self.models:
                raise ValueError(f"base.{role}: '{name}' is not defined under models ({', '.join(sorted(self.models))})")
        return self


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


def check(params: dict[str, Any]) -> list[str]:
    """Every problem in params.yaml, one line each; empty when it is valid."""
    if not isinstance(params, dict):
        return ["params.yaml: must be a mapping of sections"]
    try:
        Params.model_validate(params)
    except ValidationError as e:
        by_key: dict[str, list[str]] = {}
        for err in e.errors():  # a union gives one error per branch: one line per key
            key, msg = describe(err)
            by_key.setdefault(key, []).append(msg)
        lines = [(f"{key}: " if key != "params.yaml" else "") + " or ".join(dict.fromkeys(msgs)).replace(" or should be ", " or ") for key, msgs in by_key.items()]
        return lines
    return []


def load_params(path: Path = PARAMS, required: Iterable[str] = ()) -> dict[str, Any]:
    """All of params.yaml, checked against the one schema (stages/schema.py) before any work is done.

    Every problem is logged as one `error:` line naming the key and what it allows, then the stage exits
    (no traceback). Stages pick the sections they declare in dvc.yaml.

    Args:
        path: the params file.
        required: sections this stage reads; their absence is an error here rather than a KeyError later.
    """
    from headline_bench import settings as schema

    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        fail(f"{path}: not found (run the stage from the repository root)")
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    problems = schema.check(params)
    problems += [f"{section}: missing (this stage needs it)" for section in required if isinstance(params, dict) and section not in params]
    if problems:
        fail("\n".join(f"{path}: {p}" for p in problems))
    return params
