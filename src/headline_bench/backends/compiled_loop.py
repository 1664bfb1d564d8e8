"""A gpt-fast style greedy decode loop on transformers' own model and StaticCache (the `compiled_loop` technique).

`generate()` wraps every decode step in ~35-40 small eager operations (a new 4D mask, a float32 logits copy, logits
processors, stopping criteria) and syncs with the host once per token for its stop check. Here one step function
does everything a step needs, traced with `fullgraph=True` (CUDA graphs on a GPU, `mode: reduce-overhead`):

- the attention mask and the position ids are built in-graph from a device-side position `pos`, so no host value
  enters the step and two prompt lengths in the same cache bucket share one compiled frame;
- argmax and the relative top-2 margin go into preallocated buffers at a device-side step index;
- a device-side `done` flag per row is updated in-graph; rows that are done emit the pad id (as `generate` does);
- for Llama-family models the step is written out (backends/fused_llama.py): q/k/v and gate/up as one matmul each,
  weights fused once at load, grouped-query attention without per-head copies of the keys; other models step through
  their own forward.

Stopping on EOS, the host reads the "every row done" flag two steps late and every second step (a pinned copy + an
event on CUDA), so one step is always queued behind the one it waits for and the host waits at most once per two
steps; with EOS at step s the loop yields s + 1 tokens, runs at most two forwards more than needed and cuts their
columns off. Fixed-length runs (random weights: min_new_tokens == max_new_tokens) read nothing until every step is
queued. After the prefill a device flag records whether the cache was written (a forward that ignored the cache it
was given would decode without context, with plausible timings); it is read with the stop column at the end of the
call and fails loudly.

The cache is sized to prompt + new tokens rounded up to `bucket` slots (a 640-slot cache for ~85-token contexts made
every step read 7x the keys it needed) and reused across calls of the same bucket and batch size. Prefill runs eager
with the model's own 2D-mask handling (exactly what `generate` does, so left padding behaves the same).

On CPU three more knobs pay (params `decode_loop`, measured in docs/results/decode-cpu): the step's attention written as arithmetic
that inductor fuses (`grouped_attention`), no dynamo guards on the model's modules, and inductor's freezing with
concatenated int4 matmuls and a C++ launcher (`decode_loop.inductor`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from headline_bench.backends.fused_llama import FusedStep, grouped_attention
from headline_bench.measure.trackers import relative_margin

STEP_ATTENTION = "headline_bench_step"  # the attention implementation name `use_step_attention` registers


def step_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """One query token over the cache as plain arithmetic (multiply-sum, masked softmax, multiply-sum in float32)
    that inductor fuses into its own generated loops; everything else (prefill, no boolean mask) goes to the model's
    sdpa unchanged. Why: on a 2-core CPU torch's flash-attention kernel cost ~84 us a call for one query over <= 128
    keys, 2.5 ms of a ~10 ms SmolLM2 step (30 calls). Grouped-query heads are broadcast, never copied (no repeat_kv)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    b, heads, _, d = query.shape
    visible = attention_mask.view(b, -1)  # [B, L]
    out = grouped_attention(query, key, value, visible, scaling if scaling is not None else d**-0.5, arithmetic=True)
    return out.view(b, 1, heads, d), None


def apply_inductor(overrides: dict[str, Any]) -> None:
    """Set the decode loop's inductor options process-wide before the first compile; a nested dict is a sub-config
    (cpp: {enable_concat_linear: true} sets cpp.enable_concat_linear). A name inductor does not know is an InputError,
    not a silently ignored knob. A process that runs several techniques wraps each in `inductor_restored`."""
    import torch._inductor.config as inductor

    from headline_bench.errors import InputError

    flat = {f"{name}.{sub}": v for name, value in overrides.items() if isinstance(value, dict) for sub, v in value.items()}
    flat |= {name: value for name, value in overrides.items() if not isinstance(value, dict)}
    for name, value in flat.items():
        try:
            setattr(inductor, name, value)
        except AttributeError:
            raise InputError(f"decode_loop.inductor: torch._inductor.config has no option {name!r}") from None


@contextmanager
def inductor_restored() -> Iterator[None]:
    """Inductor's process-wide options as they were before the block, after it: in the GPU check's shared worker one
    technique's options (coordinate_descent_tuning, freezing) must not carry into the next technique's compile."""
    import torch._inductor.config as inductor

    before = inductor.get_config_copy()
    try:
        yield
    finally:
        for name, value in before.items():
            if getattr(inductor, name) != value:
                setattr(inductor, name, value)


def inductor_options(passed: dict[str, Any]) -> dict[str, Any]:
    """The inductor options a compile runs with, for perf.json: every process-wide option away from its default
    (decode_loop.inductor, TORCHINDUCTOR_* variables), overlaid with the options given to torch.compile itself (its
    mode's, e.g. triton.cudagraphs); a value that is not plain JSON as its repr."""
    import torch._inductor.config as inductor

    defaults = {name: entry.default for name, entry in inductor._config.items()}
    changed = {k: v for k, v in inductor.get_config_copy().items() if not k.startswith("_") and k in defaults and v != defaults[k]}
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in {**changed, **passed}.items()}


def use_step_attention(model: Any) -> None:
    """Switch the model to `step_attention`, with sdpa's mask (prefill builds exactly the masks it built before)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(STEP_ATTENTION, step_attention)
    AttentionMaskInterface.register(STEP_ATTENTION, sdpa_mask)
    model.set_attn_implementation(STEP_ATTENTION)


@dataclass
class LoopOutput:
    """What one call of DecodeLoop produced: ids [B, T] (pad after a row's EOS; T ends with the last row's EOS or at
    max_new_tokens), margins [B, T], and the forwards run (prefill included; up to two more than T after EOS)."""

    ids: torch.Tensor
    margins: torch.Tensor
    forwards: int


def cache_kwarg(model: Any) -> str:
    """The name under which this transformers' forward takes a cache (`past_key_values`; `cache` where renamed): a
    name the forward does not declare would vanish into its **kwargs and the loop would decode without context."""
    params = inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache"):
        if name in params:
            return name
    raise RuntimeError(f"compiled_loop: {type(model).__name__}.forward takes no `past_key_values` or `cache` argument")


def round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


class DecodeLoop:
    """Greedy decoding with one compiled step per token.

    Args:
        model: a causal LM whose forward accepts a 4D boolean mask, position_ids, a cache (`cache_kwarg`) and logits_to_keep
            (transformers' Llama family does).
        eos_ids: ids that end a row (newline ids included for the headline task).
        pad_id: what a finished row emits afterwards.
        compile_mode: torch.compile mode ("default" on CPU, "reduce-overhead" for CUDA graphs), None: eager steps
            (for tests that compare the loop with and without compilation).
        bucket: cache slots are prompt + new tokens rounded up to a multiple of this.
        backend: torch.compile backend; tests use "eager" (or a graph-counting callable) to check the trace
            (fullgraph, frames, ops) without inductor.
        module_guards: keep dynamo's guards on the model's modules. Checking them before every step cost ~1.1 ms of
            ~10 on a 2-core CPU (profiler: cache lookup 1.44 -> 0.32 ms a call without them); the loop never changes
            the model after setup, and with inductor's freezing its weights are compiled-in constants anyway. The
            guards on the loop's own state (buffers, cache, suppress_eos) stay.
        attention: "sdpa" (torch's) or "fused" (multiply-sum arithmetic inductor fuses: `grouped_attention`; with the
            model's own step the model is switched to `step_attention`).
        step: "auto": the written-out step of backends/fused_llama.py (fused q/k/v and gate/up, grouped-query
            attention without copies) where the architecture has one, else the model's own forward; "fused" or
            "model" to insist on one (tests compare them).
    """

    def __init__(self, model: Any, eos_ids: set[int], pad_id: int, compile_mode: str | None = "default", bucket: int = 64,
                 backend: str | Callable[..., Any] = "inductor", module_guards: bool = False, attention: str = "sdpa",
                 step: str = "auto") -> None:
        self.fused = FusedStep(model) if step != "model" and FusedStep.supports(model) else None
        self.arithmetic = attention == "fused"  # the fused step's attention (an argument: guarded, unlike a module's field)
        if step == "fused" and self.fused is None:
            raise ValueError(f"compiled_loop: no fused step for model_type {getattr(model.config, 'model_type', None)!r}")
        if attention == "fused" and self.fused is None:
            use_step_attention(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self.bucket = bucket
        self.limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.cache_arg = cache_kwarg(model)
        # two methods, not one with a branch on self.fused: dynamo shares a code object's compiled frames across loops,
        # and without module guards a frame traced through a FusedStep would be checked against a loop without one
        self.step_fn: Callable[..., None] = self._fused_step if self.fused is not None else self._model_step
        self.compile_options: dict[str, Any] = {}
        if compile_mode is not None:
            # torch.compile takes a mode or options, not both: the mode goes in as the inductor options it stands for
            options: dict[str, Any] = {}
            if backend == "inductor":
                from torch._inductor import list_mode_options

                options = list_mode_options(compile_mode)
            self.compile_options = dict(options)  # what perf.json's inductor_options lays on the process-wide ones
            if not module_guards:
                options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            self.step_fn = torch.compile(self.step_fn, fullgraph=True, dynamic=False, backend=backend, options=options)
        self._state: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.forwards = 0  # model forwards run, prefill included (tests count the extra one after EOS)

    # -- state ---------------------------------------------------------------------------------------------------------
    def _buffers(self, batch: int, slots: int, steps: int) -> dict[str, Any]:
        """Cache and device buffers for one (batch, cache slots, steps) shape, allocated once and marked static so the
        compiled step (and its CUDA graph) sees the same addresses every call."""
        key = (batch, slots, steps)
        if key not in self._state:
            from transformers import StaticCache

            d = self.device
            state = {
                "cache": StaticCache(config=self.model.config, max_cache_len=slots),
                "token": torch.zeros(batch, 1, dtype=torch.long, device=d),
                "pos": torch.zeros((), dtype=torch.long, device=d),  # cache slot of the token being fed
                "t": torch.zeros(1, dtype=torch.long, device=d),  # column of the token being produced
                "keep": torch.zeros(batch, slots, dtype=torch.bool, device=d),  # False on left padding
                "pad": torch.zeros(batch, dtype=torch.long, device=d),  # left pads per row
                "done": torch.zeros(batch, dtype=torch.bool, device=d),
                "kept": torch.zeros(1, dtype=torch.long, device=d),  # columns written while some row was still going
                "stop_at": torch.zeros(1, dtype=torch.long, device=d),  # `kept` once every row is done, 0 before
                "cache_filled": torch.zeros((), dtype=torch.bool, device=d),  # the prefill wrote the cache (checked at the end)
                "ids": torch.zeros(batch, steps, dtype=torch.long, device=d),
                "margins": torch.zeros(batch, steps, dtype=torch.float32, device=d),
            }
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    torch._dynamo.mark_static_address(value)
            self._state[key] = state
        return self._state[key]

    # -- one token -----------------------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, s: dict[str, Any], suppress_eos: bool) -> None:
        """Write the next token of every row, its margin and the done flags into the state buffers (in place)."""
        logits = logits.float()
        if suppress_eos:  # generate()'s MinNewTokensLengthLogitsProcessor: EOS cannot win before min_new_tokens
            logits = logits.index_fill(1, self.eos, float("-inf"))
        nxt, margin = logits.argmax(dim=-1), relative_margin(logits)
        nxt = torch.where(s["done"], self.pad_id, nxt)
        s["ids"].index_copy_(1, s["t"], nxt[:, None])
        s["margins"].index_copy_(1, s["t"], margin[:, None])
        s["kept"].add_((~s["done"].all()).long().view(1))
        s["done"].logical_or_(torch.isin(nxt, self.eos))
        s["stop_at"].copy_(torch.where(s["done"].all(), s["kept"], 0))
        s["token"].copy_(nxt[:, None])
        s["t"].add_(1)

    def _where(self, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's mask and positions, from `pos`, a device tensor (no host value enters the step)."""
        slots = s["keep"].shape[1]
        visible = (torch.arange(slots, device=s["keep"].device) <= s["pos"]) & s["keep"]  # [B, L]
        position_ids = (s["pos"] - s["pad"]).unsqueeze(1)  # [B, 1]: generate's cumsum(mask) - 1 for the new token
        return visible, position_ids

    def _fused_step(self, s: dict[str, Any], suppress_eos: bool) -> None:
        """One decode step through backends/fused_llama.py, built to trace as a single graph."""
        visible, position_ids = self._where(s)
        logits = self.fused(s["token"], position_ids, visible, s["cache"], s["pos"], self.arithmetic)
        s["pos"].add_(1)
        self._pick(logits, s, suppress_eos)

    def _model_step(self, s: dict[str, Any], suppress_eos: bool) -> None:
        """One decode step through the model's own forward, built to trace as a single graph."""
        visible, position_ids = self._where(s)
        out = self.model(input_ids=s["token"], attention_mask=visible[:, None, None, :], position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: s["cache"]})
        s["pos"].add_(1)
        self._pick(out.logits[:, -1], s, suppress_eos)

    def shape(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[int, int, int]:
        """The (batch, cache slots, steps) a call compiles for: one frame and one cache per shape (the cache tensors
        are static addresses, which dynamo guards by identity, so a new shape is a new frame)."""
        batch, length = input_ids.shape
        slots = round_up(length + max_new_tokens, self.bucket)
        if self.limit:
            slots = min(slots, max(self.limit, length + max_new_tokens))
        return batch, slots, max_new_tokens

    def _filled(self, cache: Any, length: int) -> torch.Tensor:
        """Whether the prefill wrote every layer's cache at the prompt's last slot (never padding: prompts are left
        padded), as a device flag read at the end of the call; a layer never written at all fails here, on the host."""
        if not all(getattr(layer, "is_initialized", True) for layer in cache.layers):
            raise RuntimeError(f"compiled_loop: the prefill never wrote the static cache: {type(self.model).__name__}.forward "
                               f"ignored `{self.cache_arg}=`, so every step would decode without context")
        return torch.stack([layer.keys[:, :, length - 1].ne(0).any() for layer in cache.layers]).all()

    # -- a call --------------------------------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, suppress_eos: bool) -> dict[str, Any]:
        """Reset the buffers for this batch and run the prompt eagerly; the first token lands in column 0.

        Args:
            input_ids: [B, S] left-padded prompts.
            attention_mask: [B, S], 0 on padding.
        """
        length = input_ids.shape[1]
        s = self._buffers(*self.shape(input_ids, max_new_tokens))
        s["cache"].reset()
        s["keep"].fill_(True)
        s["keep"][:, :length].copy_(attention_mask.bool())
        s["pad"].copy_(length - attention_mask.sum(dim=1))
        for name in ("done", "kept", "stop_at", "t", "margins", "ids"):
            s[name].zero_()
        s["pos"].fill_(length)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: s["cache"]})
        self.forwards += 1
        s["cache_filled"].copy_(self._filled(s["cache"], length))
        self._pick(out.logits[:, -1], s, suppress_eos)
        return s

    def decode(self, s: dict[str, Any], max_new_tokens: int, stop_on_eos: bool, mark: Callable[[], None] = lambda: None) -> LoopOutput:
        """Run the compiled step until max_new_tokens or (stop_on_eos) every row is done.

        The stop flag is read two steps late and every second step: before step i (i even) the host waits for the
        flag queued after step i - 2, while step i - 1 is still queued behind it, so the GPU never runs dry and the
        host waits at most once per two steps. The loop runs at most two forwards past the last row's EOS; the
        columns they wrote are cut off (`stop_at`). A fixed-length run reads nothing until every step is queued.

        Args:
            mark: called after each step is queued (the step clock's stamp or CUDA event).
        """
        host = torch.zeros(1, dtype=torch.long, pin_memory=self.device.type == "cuda")
        event = self._queue_stop(s, host) if stop_on_eos else None  # after the prefill's token (step 0)
        produced = 1
        for i in range(1, max_new_tokens):
            if stop_on_eos and i % 2 == 0 and self._read_stop(host, event):  # the flag of step i - 2
                break
            self.step_fn(s, not stop_on_eos)  # a fixed-length run suppresses EOS, as min_new_tokens does in generate()
            self.forwards += 1
            produced += 1
            mark()
            if stop_on_eos and i % 2 == 0:
                event = self._queue_stop(s, host)
        return self._finish(s, produced)

    def _queue_stop(self, s: dict[str, Any], host: torch.Tensor) -> Any:
        """Copy `stop_at` to host memory without waiting (a pinned copy and an event on CUDA; None on CPU)."""
        cuda = self.device.type == "cuda"
        host.copy_(s["stop_at"], non_blocking=cuda)
        if not cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def _read_stop(host: torch.Tensor, event: Any) -> bool:
        """The flag queued two steps ago: the GPU has usually finished it, so the wait is short or none."""
        if event is not None:
            event.synchronize()
        return bool(host[0])

    def _finish(self, s: dict[str, Any], produced: int) -> LoopOutput:
        """One read after the last step is queued (the caller copies the margins right after anyway): the columns to
        keep, and the prefill's cache check (`cache_filled`), which fails loudly rather than time a context-free loop."""
        stop_at, filled = torch.stack([s["stop_at"][0], s["cache_filled"].long()]).tolist()
        if not filled:
            raise RuntimeError(f"compiled_loop: the prefill left the static cache empty: {type(self.model).__name__}.forward "
                               f"did not write the cache passed as `{self.cache_arg}=`, so every step would decode without context")
        kept = min(produced, stop_at) if stop_at else produced
        return LoopOutput(s["ids"][:, :kept], s["margins"][:, :kept], produced)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop_on_eos: bool = True,
                 mark: Callable[[], None] = lambda: None) -> LoopOutput:
        """Greedy ids and margins for a left-padded batch; `mark` is called after the first token and each step."""
        with torch.inference_mode():
            s = self.prefill(input_ids, attention_mask, max_new_tokens, suppress_eos=not stop_on_eos)
            mark()
            return self.decode(s, max_new_tokens, stop_on_eos, mark)
