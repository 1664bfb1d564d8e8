"""The compiled decode loop (backends/compiled_loop.py) against greedy generate(), and the timers that must not slow
what they time (measure/trackers.py): token ids, margins, early stop, one traced frame, no host sync in the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from headline_bench.backends.compiled_loop import DecodeLoop
from headline_bench.measure import trackers
from headline_bench.measure.roofline import bandwidth_share, embedding_read

EOS = 2
PROMPTS = ["a summary of the news, in a few words", "short"]


@pytest.fixture(scope="module")
def model_tok(tiny_llama: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    return model, tok


def reference(model: Any, tok: Any, prompts: list[str], n: int, eos: set[int], fixed: bool) -> tuple[torch.Tensor, list[list[float]]]:
    """generate()'s greedy ids [B, T] (pad after EOS) and TokenTimer's margins, for the same stop ids."""
    from headline_bench.backends.transformers import encode

    inputs = encode(tok, prompts, "cpu")
    timer = trackers.TokenTimer("cpu")
    timer.reset()
    extra = {"min_new_tokens": n} if fixed else {}
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n, eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id,
                         logits_processor=[timer], **extra)
    start = inputs["input_ids"].shape[1]
    new = out[:, start:]
    return new, [timer.margins(b, start, new.shape[1]) for b in range(len(prompts))]


def run_loop(loop: DecodeLoop, tok: Any, prompts: list[str], n: int, stop: bool) -> Any:
    from headline_bench.backends.transformers import encode

    inputs = encode(tok, prompts, "cpu")
    return loop(inputs["input_ids"], inputs["attention_mask"], n, stop_on_eos=stop)


@pytest.mark.parametrize("step", ["fused", "model"])
@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fixed", [False, True])
def test_loop_equals_greedy_generate(model_tok: tuple[Any, Any], batch: int, fixed: bool, attention: str, step: str) -> None:
    """Batch 1 and a left-padded batch of 2, EOS-stopped and fixed-length, with sdpa and with the arithmetic
    attention, the written-out step (fused q/k/v and gate/up, grouped-query attention) and the model's own forward:
    same ids as generate() (sdpa throughout), margins within 1e-6. The step is traced with fullgraph=True (the eager
    backend: dynamo's trace without inductor's compile time)."""
    model, tok = model_tok
    prompts = PROMPTS[:batch]
    fixed_ids, _ = reference(model, tok, prompts, 10, {EOS}, fixed=True)
    # a stop id the model actually writes mid-way, so the EOS-stopped run really stops early (random weights)
    eos = {EOS} if fixed else {int(fixed_ids[0, 4])}
    want, want_margins = reference(model, tok, prompts, 10, eos, fixed)
    loop = DecodeLoop(model, eos, tok.pad_token_id, compile_mode="default", backend="eager", attention=attention, step=step)
    try:
        out = run_loop(loop, tok, prompts, 10, stop=not fixed)
    finally:
        model.set_attn_implementation("sdpa")  # the fixture's model is shared
    got = out.ids[:, : want.shape[1]]
    assert torch.equal(got, want), (got, want)
    assert out.ids.shape[1] == want.shape[1]  # the steps run past the last row's EOS are cut off
    for b in range(batch):
        assert out.margins[b, : want.shape[1]].tolist() == pytest.approx(want_margins[b], abs=1e-6)


def test_eos_at_step_s_gives_s_plus_1_tokens_and_at_most_two_extra_forwards(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    probe = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None)
    ids = run_loop(probe, tok, PROMPTS[:1], 12, stop=False).ids[0].tolist()
    s = next(i for i in range(2, 12) if ids[i] not in ids[:i])  # first step whose token is new: it becomes the EOS
    loop = DecodeLoop(model, {ids[s]}, tok.pad_token_id, compile_mode=None)
    out = run_loop(loop, tok, PROMPTS[:1], 12, stop=True)
    from headline_bench.backends.base import count_new_tokens

    assert count_new_tokens(out.ids[0], tok.pad_token_id, {ids[s]}) == s + 1
    assert out.ids[0].tolist() == ids[: s + 1]  # the extra steps' columns are cut off
    assert s + 1 <= out.forwards == loop.forwards <= s + 3  # prefill + s steps are needed; the flag is read two steps late


def test_step_compiles_to_one_frame_across_prompt_lengths(model_tok: tuple[Any, Any]) -> None:
    """Inductor, fullgraph=True (a graph break would raise): two prompt lengths in the same cache bucket, one frame,
    and the compiled loop's ids equal the eager loop's."""
    from torch._dynamo.utils import counters

    model, tok = model_tok
    torch._dynamo.reset()
    loop = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode="default")
    eager = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None)
    before = counters["stats"]["unique_graphs"]
    for prompt in ("a summary of the news", "another, longer summary of the news today"):
        got = run_loop(loop, tok, [prompt], 6, stop=True)
        want = run_loop(eager, tok, [prompt], 6, stop=True)
        assert torch.equal(got.ids, want.ids)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert len(loop._state) == 1  # one cache, reused across calls


class FakeEvent:
    """torch.cuda.Event on a CPU: record() notes the order, elapsed_time() gives 1 ms per event, synchronize() counts."""

    made = 0
    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        FakeEvent.made += 1
        self.index = FakeEvent.made

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, other: FakeEvent) -> float:
        return float(other.index - self.index)


@pytest.fixture()
def host_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of everything that would make the host wait for the GPU: cuda.synchronize, Event.synchronize, and
    reading a tensor's value (.item(), .cpu(), .tolist(), bool())."""
    counts = {"cuda.synchronize": 0}
    FakeEvent.made = FakeEvent.syncs = 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: counts.__setitem__("cuda.synchronize", counts["cuda.synchronize"] + 1))
    return counts


def count_reads(monkeypatch: pytest.MonkeyPatch, counts: dict[str, int], order: list[str] | None = None) -> None:
    """Count every read of a tensor's value (each one a host sync on a GPU) and append it to `order`, if given."""
    for name in ("item", "cpu", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)
        counts[name] = 0

        def counting(self: torch.Tensor, *a: Any, _name: str = name, _f: Any = original, **k: Any) -> Any:
            counts[_name] += 1
            if order is not None:
                order.append("read")
            return _f(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)


def decode_log(loop: DecodeLoop, tok: Any, n: int, stop: bool, monkeypatch: pytest.MonkeyPatch, host_syncs: dict[str, int]) -> tuple[list[str], Any, Any]:
    """The decode part of a call as an ordered log of 'step' (a step queued, the clock's mark) and 'read' (a host
    sync: a value read or an Event.synchronize), with the CUDA event clock."""
    from headline_bench.backends.transformers import encode

    inputs = encode(tok, PROMPTS[:1], "cpu")
    clock = trackers.CudaEventClock("cuda")
    clock.start()
    order: list[str] = []
    monkeypatch.setattr(FakeEvent, "synchronize", lambda self: order.append("read"))
    with torch.inference_mode():
        state = loop.prefill(inputs["input_ids"], inputs["attention_mask"], n, suppress_eos=not stop)
        clock.mark()
        with monkeypatch.context() as m:
            count_reads(m, host_syncs, order)
            out = loop.decode(state, n, stop_on_eos=stop, mark=lambda: (order.append("step"), clock.mark()))
    return order, out, clock


def test_event_clock_makes_no_host_sync_inside_the_loop(model_tok: tuple[Any, Any], host_syncs: dict[str, int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed-length run of the loop with the CUDA event clock: no sync and no value read until the last step is
    queued, then one (the cut-off column and the cache check); one synchronize on the last event when the times are
    read."""
    model, tok = model_tok
    loop = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None)
    order, out, clock = decode_log(loop, tok, 8, False, monkeypatch, host_syncs)
    assert order == ["step"] * 7 + ["read"] and out.forwards == 8
    assert host_syncs["cuda.synchronize"] == 1  # clock.start()
    seconds = clock.seconds()
    assert order[-1] == "read" and len(seconds) == 8 and seconds == sorted(seconds)
    ttft, tpot = trackers.ttft_tpot(seconds)
    assert ttft == pytest.approx(1e-3) and tpot == pytest.approx(1e-3)


def test_eos_mode_syncs_at_most_once_per_two_steps(model_tok: tuple[Any, Any], host_syncs: dict[str, int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping on EOS (an id the model never writes, so all 12 tokens run): the host reads the stop flag only
    before even steps, with the step before still queued, and at most once per two tokens in all."""
    model, tok = model_tok
    loop = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None)
    order, out, _ = decode_log(loop, tok, 12, True, monkeypatch, host_syncs)
    assert out.forwards == 12 and order.count("step") == 11
    reads = [i for i, e in enumerate(order) if e == "read"]
    assert len(reads) <= 12 // 2, order
    # the flag of step i - 2 is read before step i (i even), when steps up to i - 1 are queued; the last read is the end's
    assert [order[:r].count("step") for r in reads] == [1, 3, 5, 7, 9, 11], order


def test_token_timer_on_cuda_records_events_not_syncs(host_syncs: dict[str, int]) -> None:
    timer = trackers.TokenTimer("cuda")
    timer.reset()
    for _ in range(5):
        timer(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[3.0, 1.0, 0.0]]))
    assert host_syncs["cuda.synchronize"] == 1 and FakeEvent.syncs == 0  # reset() alone
    assert timer.ttft() == pytest.approx(1e-3) and timer.tpot() == pytest.approx(1e-3)
    assert FakeEvent.syncs == 1


def test_timing_check_flags_a_gap_over_two_percent() -> None:
    assert trackers.timing_gap(1.0, [0.1, 0.5, 0.99]) == pytest.approx(0.01)
    assert trackers.timing_check([0.01, None])["timing_check"] == "ok"
    assert "5.0%" in trackers.timing_check([0.01, 0.05])["timing_check"]
    assert trackers.timing_check([None])["timing_gap_max"] is None


def test_mbu_reads_one_row_of_an_untied_embedding(model_tok: tuple[Any, Any]) -> None:
    model, _ = model_tok
    emb = model.get_input_embeddings().weight
    facts = embedding_read(model)
    tied = model.get_output_embeddings().weight is emb
    assert facts["embedding_row_bytes"] == emb.shape[1] * emb.element_size()
    assert facts["untied_embedding_bytes"] == (0 if tied else emb.numel() * emb.element_size())
    # Llama-3.1-8B's shape in bf16: 16.06 GB of weights, of which the untied 128,256 x 4,096 embedding is 1.05 GB
    embedding, row = 128256 * 4096 * 2, 4096 * 2
    whole = bandwidth_share(16.06e9, 0, 0, 1, 0.005, 4800)
    read = bandwidth_share(16.06e9, 0, 0, 1, 0.005, 4800, embedding, row)
    assert read["bytes_per_step_mb"] * 2**20 == pytest.approx(16.06e9 - embedding + row)
    assert read["bandwidth_share"] < whole["bandwidth_share"]
    assert bandwidth_share(16.06e9, 0, 0, 2, 0.005, 4800, embedding, row)["bytes_per_step_mb"] * 2**20 == pytest.approx(16.06e9 - embedding + 2 * row)


def test_prewarm_compiles_every_cache_shape_before_the_timed_run(tiny_llama: Path, models_dir: Path) -> None:
    """Prompts in two cache buckets: the hook run before the warm-up traces both shapes, the timed calls trace none."""
    from torch._dynamo.utils import counters

    from headline_bench.backends.transformers import setup
    from headline_bench.settings import parse
    from headline_bench.techniques.config import resolve

    params = parse({"base": {"model": "tiny", "target": "tiny", "dtype": "float32"}, "generate": {"max_new_tokens": 6, "max_input_tokens": 900},
                    "techniques": {"compiled_loop": {"decode_loop": {"mode": "default", "bucket": 16}}}})
    cfg = resolve(params, "compiled_loop")
    torch._dynamo.reset()
    generate_fn, _, info = setup(cfg, params, "cpu")
    prompts = ["news", "a much longer summary of the news of the day, in many more words", "more news"]
    before = counters["stats"]["unique_graphs"]
    info["before_warmup"](prompts)
    assert [s[1] for s in info["decode_loop"]["compiled_shapes"]] == [16, 80] and info["compile_s"] > 0
    assert info["inductor_options"] == {}  # CPU: mode "default" adds none, no decode_loop.inductor
    assert info["decode_loop"]["step"] == "fused"  # a Llama: the written-out step
    compiled = counters["stats"]["unique_graphs"]
    assert compiled - before == 2
    gens = [g for p in prompts for g in generate_fn([p])]
    assert counters["stats"]["unique_graphs"] == compiled
    assert all(g.ttft_s and g.tpot_s and g.timing_gap is not None and len(g.margins) == g.new_tokens for g in gens)


def test_inductor_knob_sets_nested_options_and_rejects_unknown_names() -> None:
    """decode_loop.inductor: a nested dict is a sub-config, an unknown name is a one-line InputError."""
    import torch._inductor.config as inductor

    from headline_bench.backends.compiled_loop import apply_inductor
    from headline_bench.errors import InputError

    with inductor.patch({"freezing": False, "cpp.enable_concat_linear": False}):
        apply_inductor({"freezing": True, "cpp": {"enable_concat_linear": True}})
        assert inductor.freezing and inductor.cpp.enable_concat_linear
        with pytest.raises(InputError, match="no option 'cpp.no_such_option'"):
            apply_inductor({"cpp": {"no_such_option": True}})
    assert not inductor.freezing


def test_cpu_recipe_keeps_the_loop_ids(tiny_llama: Path) -> None:
    """compiled_loop_cpu as params.yaml sets it (torchao int4, fused step attention and its inductor options: freezing,
    concatenated int4 matmuls, C++ wrapper): the compiled step runs 4 int4 matmuls per layer, not 7 (q/k/v and gate/up
    concatenated), no sdpa kernel, and writes the ids of the eager loop with sdpa on the same int4 model. Float32
    activations: in bf16 the random tiny model's near-ties flip with any change of rounding order, which says nothing
    about the options."""
    import re

    import yaml
    from torch._inductor.utils import run_and_get_code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headline_bench.backends.compiled_loop import apply_inductor, inductor_restored
    from headline_bench.files import ROOT
    from headline_bench.settings import parse
    from headline_bench.techniques.quantize import apply_quantize

    recipe = parse(yaml.safe_load((ROOT / "params.yaml").read_text())).techniques["compiled_loop_cpu"]
    assert recipe.decode_loop.inductor  # the recipe under test sets inductor options
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    # the tiny model's rows are 64 wide and its 259-token head no multiple of 16 (int4 packing): group 32, dense head
    model = apply_quantize(model, recipe.quantize.model_copy(update={"group_size": 32, "include_lm_head": False}))
    torch._dynamo.reset()
    with inductor_restored():  # the recipe's options (freezing, cpp_wrapper) must not reach the later tests' compiles
        apply_inductor(recipe.decode_loop.inductor)
        loop = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode="default", attention=recipe.decode_loop.attention)
        got, code = run_and_get_code(run_loop, loop, tok, PROMPTS, 8, False)
    model.set_attn_implementation("sdpa")  # the reference: eager steps with the model's own attention
    layers = model.config.num_hidden_layers
    assert sum(len(re.findall(r"int4pack_mm\w*(?:\.default)?\(", c)) for c in code) == 4 * layers
    assert not any("scaled_dot_product" in c for c in code)
    want = run_loop(DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None), tok, PROMPTS, 8, stop=False)
    assert torch.equal(got.ids, want.ids)


def test_without_module_guards_the_loop_still_guards_its_own_inputs(model_tok: tuple[Any, Any]) -> None:
    """module_guards=False (the default) drops dynamo's checks on the model's modules only: EOS suppression on and
    off still trace two graphs, and each writes what the eager loop writes."""
    from torch._dynamo.utils import counters

    model, tok = model_tok
    probe = run_loop(DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None), tok, PROMPTS[:1], 8, stop=False).ids[0]
    eos = {int(probe[3])}  # a token the model writes at step 3: suppressed in the fixed run, a stop in the other
    torch._dynamo.reset()
    loop = DecodeLoop(model, eos, tok.pad_token_id, compile_mode="default", backend="eager")
    eager = DecodeLoop(model, eos, tok.pad_token_id, compile_mode=None)
    before = counters["stats"]["unique_graphs"]
    for stop in (False, True):
        got, want = run_loop(loop, tok, PROMPTS[:1], 8, stop), run_loop(eager, tok, PROMPTS[:1], 8, stop)
        assert torch.equal(got.ids, want.ids)
    assert counters["stats"]["unique_graphs"] - before == 2


class CacheIgnoring(torch.nn.Module):
    """A causal LM whose prefill takes the cache argument and drops it (as a transformers that does not know the name
    would swallow it in **kwargs): the steps then decode without the prompt's context."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner, self.config, self.ignore = model, model.config, True

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        return self.inner(input_ids, cache=None if self.ignore and input_ids.shape[1] > 1 else cache, **kwargs)


def test_a_forward_that_ignores_the_cache_fails_loudly(model_tok: tuple[Any, Any]) -> None:
    """The cache never written: an error at the prefill. Written by an earlier call, then ignored (reset to zeros,
    never filled again): the device flag, read at the end of the call, fails it. Never a quiet context-free run."""
    model, tok = model_tok
    wrapped = CacheIgnoring(model)
    loop = DecodeLoop(wrapped, {EOS}, tok.pad_token_id, compile_mode=None)
    assert loop.cache_arg == "cache"
    with pytest.raises(RuntimeError, match="never wrote the static cache"):
        run_loop(loop, tok, PROMPTS[:1], 4, stop=False)
    wrapped.ignore = False
    want = run_loop(loop, tok, PROMPTS[:1], 4, stop=False)
    assert torch.equal(want.ids, run_loop(DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None), tok, PROMPTS[:1], 4, False).ids)
    wrapped.ignore = True
    for stop in (False, True):
        with pytest.raises(RuntimeError, match="left the static cache empty"):
            run_loop(loop, tok, PROMPTS[:1], 4, stop=stop)


def test_cache_argument_name_follows_the_forward_signature() -> None:
    from headline_bench.backends.compiled_loop import cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, input_ids: Any, past_key_values: Any = None, **kwargs: Any) -> None: ...

    class New(torch.nn.Module):
        def forward(self, input_ids: Any, cache: Any = None, **kwargs: Any) -> None: ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids: Any, **kwargs: Any) -> None: ...

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    with pytest.raises(RuntimeError, match="takes no `past_key_values` or `cache`"):
        cache_kwarg(Neither())


def test_timed_run_counts_cudagraph_skips_and_recompiles_of_its_own_calls_only() -> None:
    """runner.run's window: what the warm-up compiles or skips is not counted, what happens in the timed calls is."""
    from torch._dynamo.utils import counters

    from headline_bench.backends.base import Generation
    from headline_bench.measure.runner import run

    calls = []

    def generate_fn(prompts: list[str]) -> list[Generation]:
        calls.append(prompts)
        counters["inductor"]["cudagraph_skips"] += 1
        counters["stats"]["unique_graphs"] += 2 if len(calls) == 1 else 0  # the warm-up call compiles
        return [Generation(p, p, 3, 2, 0.01, 0.004, 0.006) for p in prompts]

    _, perf = run(generate_fn, ["a", "b"], 1, 1, "cpu")
    assert perf["cudagraph_skips_in_timed_run"] == 2 and perf["recompiles_in_timed_run"] == 0


def test_inductor_options_are_recorded_and_restored_between_techniques(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check's shared worker: technique a sets decode_loop.inductor options; b compiles with inductor's own
    defaults again, and each perf.json names the options its compile ran with."""
    import torch._inductor.config as inductor

    from headline_bench import benchmark, files, gpu_check, settings
    from headline_bench.backends.compiled_loop import apply_inductor, inductor_options

    seen: dict[str, dict[str, Any]] = {}
    written: dict[str, dict[str, Any]] = {}

    def generate(name: str, params: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        seen[name] = inductor_options({})
        if name == "a":
            apply_inductor({"coordinate_descent_tuning": True, "cpp": {"enable_concat_linear": True}})
        return [], {"technique": name, "inductor_options": inductor_options({"triton.cudagraphs": True})}

    monkeypatch.setattr(benchmark, "generate", generate)
    monkeypatch.setattr(benchmark, "write_outputs", lambda name, records, perf: written.__setitem__(name, perf))
    monkeypatch.setattr(settings, "load_params", lambda required: {})
    monkeypatch.setattr(files, "read_jsonl", lambda path: [{"id": 0}])
    monkeypatch.chdir(tmp_path)
    assert inductor_options({}) == {}  # the test starts from inductor's defaults
    gpu_check.worker(["a", "b"], {})
    assert seen == {"a": {}, "b": {}} and not inductor.coordinate_descent_tuning and not inductor.cpp.enable_concat_linear
    assert written["a"]["inductor_options"] == {"coordinate_descent_tuning": True, "cpp.enable_concat_linear": True, "triton.cudagraphs": True}
    assert written["b"]["inductor_options"] == {"triton.cudagraphs": True}


def test_fused_step_runs_two_matmuls_where_the_model_runs_five_and_never_copies_keys(model_tok: tuple[Any, Any]) -> None:
    """The traced step (a graph-recording backend: no compile time): per layer q/k/v and gate/up are one linear each
    (4 a layer, against the model forward's 7) and no key/value is expanded per query head (repeat_kv); the fused
    weights are made once and the model's projections are views into them (no second copy)."""
    model, tok = model_tok
    layers = model.config.num_hidden_layers
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())

    def ops(step: str) -> tuple[int, int]:
        graphs: list[torch.fx.GraphModule] = []

        def record(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        run_loop(DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode="default", backend=record, step=step), tok, PROMPTS, 4, False)
        nodes = [n for g in graphs for n in g.graph.nodes]
        linears = sum(n.target in (torch._C._nn.linear, torch.nn.functional.linear) for n in nodes)
        return linears, sum(n.target in ("expand", torch.Tensor.expand) for n in nodes)

    assert ops("model") == (7 * layers + 1, 2 * layers)  # the contrast: what the test would see without the fusion
    assert ops("fused") == (4 * layers + 1, 0)
    attn = model.model.layers[0].self_attn
    loop = DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None, step="fused")
    fused = loop.fused.layers[0].qkv.weight
    assert fused.shape[0] == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn.k_proj.weight.data_ptr() == fused.data_ptr() + attn.q_proj.weight.numel() * fused.element_size()
    assert DecodeLoop(model, {EOS}, tok.pad_token_id, compile_mode=None).fused.layers[0].qkv.weight is fused  # fused once
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == bytes_before


def test_compiled_loop_perf_records_compile_events_options_and_step(models_dir: Path) -> None:
    """The compiled_loop technique through benchmark.generate (inductor on CPU): the ids of kv_cache's generate(),
    and perf.json says which step ran, with which inductor options, and that the timed run neither recompiled nor
    skipped a CUDA graph."""
    import copy

    from test_generate import BASE_PARAMS, ROWS

    from headline_bench.backends.compiled_loop import inductor_restored
    from headline_bench.benchmark import generate
    from headline_bench.settings import parse

    params = copy.deepcopy(BASE_PARAMS)
    # coordinate_descent_tuning: gpt-fast's GPU option, a no-op for CPU kernels; restored after (the stage's process ends)
    params["techniques"]["compiled_loop"] = {"decode_loop": {"mode": "default", "bucket": 64, "inductor": {"coordinate_descent_tuning": True}}}
    expected, _ = generate("kv_cache", parse(params), ROWS)
    torch._dynamo.reset()
    with inductor_restored():
        got, perf = generate("compiled_loop", parse(params), ROWS)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in expected]
    assert perf["decode_loop"]["step"] == "fused" and perf["inductor_options"] == {"coordinate_descent_tuning": True}
    assert perf["recompiles_in_timed_run"] == 0 and perf["cudagraph_skips_in_timed_run"] == 0
