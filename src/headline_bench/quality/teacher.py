"""The fidelity stages' work: baseline's next-token distributions over its own greedy headlines (fidelity_reference),
then each lossy technique's measures against them (fidelity), teacher-forced, one forward pass per row.

Why baseline is stored rather than recomputed beside each technique: one baseline forward per row in total instead
of one per technique per row (a prefill costs ~0.3 s on 2 cores), and llama.cpp needs no transformers model
beside it. Why top-k plus the rest's mass rather than full logits: 100 rows x ~35 positions x 49,152 floats would be
~700 MB. SmolLM2's headline distributions are flat (top-1 probability ~0.45, the top 64 hold ~81% of the mass), so
k matters: on torchao_int8 (5 rows) the lumped KL was 79% of the full-vocabulary KL at k = 64, 89% at 256, 96% at
1024, 99% at 4096; `tail_mass` records what is left, and the KL over that partition is a lower bound (quality/divergence.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from headline_bench import backends
from headline_bench.analysis.verdicts import simultaneous_level
from headline_bench.data.prompts import prompts_for
from headline_bench.errors import InputError, Skip
from headline_bench.logs import log
from headline_bench.quality.divergence import METHODS, reference_topk, row_measures, summarize, token_nll
from headline_bench.quality.fidelity_scope import not_measured_record
from headline_bench.techniques.config import check_hardware, pick_device, resolve

if TYPE_CHECKING:
    from headline_bench.settings import Params


def row_sequences(records: list[dict[str, Any]], tokenizer: Any, params: Params, rows: int) -> list[dict[str, Any]]:
    """The first `rows` baseline quality records with a greedy output, as token ids: the prompt (as baseline read it),
    baseline's greedy headline (stop token included) and the data set's reference headline."""
    usable = [r for r in records if r.get("token_ids")][:rows]
    prompts, kept, _ = prompts_for(usable, tokenizer, params.prompt, params.generate.max_input_tokens)
    return [{"id": r["id"], "prompt": p.ids, "greedy": list(r["token_ids"]), "gold": tokenizer(r["reference"], add_special_tokens=False)["input_ids"]}
            for p, r in zip(prompts, kept) if r.get("reference")]


def reference_pass(params: Params, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Baseline's stored distributions: per row its top-k log-probs at every position predicting its greedy headline
    and its mean NLL of the reference headline (fidelity_reference stage)."""
    from headline_bench.techniques.load import build_model

    settings = params.fidelity
    device = pick_device(params.base.device)
    cfg = resolve(params, "baseline")
    model, tokenizer, _ = build_model(cfg, device)
    from headline_bench.backends.transformers import forced_logits

    rows = []
    for seq in row_sequences(records, tokenizer, params, settings.rows):
        greedy, gold = forced_logits(model, [seq["prompt"] + seq["greedy"], seq["prompt"] + seq["gold"]], len(seq["prompt"]), device)
        rows.append(seq | {k: v.cpu() for k, v in reference_topk(greedy, settings.top_k).items()} | {"nll": token_nll(gold, seq["gold"])})
    log.info("fidelity_reference: %d rows, top %d of baseline's distribution per position", len(rows), settings.top_k)
    return {"model": cfg.model_name, "dtype": cfg.dtype, "device": device, "top_k": settings.top_k, "vocab": int(greedy.shape[-1]) if rows else None,
            "rows": rows}


def fidelity_pass(name: str, params: Params, reference: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One technique's per-row measures against baseline's stored distributions, and their summary with states.

    Each row's two sequences (prompt + baseline's greedy headline, prompt + reference headline) go through the
    technique's engine once (`forced_setup` of its engine module); an engine without one is n/a with the reason.
    The intervals are at the simultaneous level 1 - (1 - score.confidence) / (k x d), k = the lossy family's size and
    d = the deciding measures (fidelity.decide), so the deciding intervals of every family member cover together (Bonferroni).
    """
    if record := not_measured_record(name, params):
        return [], record
    head = {"technique": name, "reference": "baseline"}
    cfg, device = resolve(params, name), pick_device(params.base.device)
    check_hardware(cfg, device)
    engine = backends.engine(cfg.engine)
    if not hasattr(engine, "forced_setup"):
        raise Skip(f"n/a: the {cfg.engine} engine gives no full next-token distributions here (vLLM's prompt_logprobs are its own top-k, "
                   "on a GPU; not wired in)")
    start = time.perf_counter()
    forced, facts = engine.forced_setup(cfg, params, device)
    loaded = time.perf_counter()
    rows = []
    for ref in reference["rows"]:
        greedy, gold = forced([ref["prompt"] + ref["greedy"], ref["prompt"] + ref["gold"]], len(ref["prompt"]))
        if greedy.shape[-1] != reference["vocab"]:
            raise Skip(f"n/a: the technique's vocabulary ({greedy.shape[-1]}) is not baseline's ({reference['vocab']})")
        m = row_measures(ref, greedy, gold)
        rows.append({"id": ref["id"], **m})
    facts |= {"load_s": loaded - start, "forward_s_per_row": (time.perf_counter() - loaded) / max(len(rows), 1)}
    s = params.score
    decide = params.fidelity.decide
    k = max(len(s.family), 1) * len(decide)
    level = simultaneous_level(s.confidence, k)
    summary = summarize(rows, params.fidelity.bounds.model_dump(), level, s.bootstrap_samples, s.seed or params.base.seed,
                        params.fidelity.min_rows, decide)
    log.info("%s: fidelity over %d rows: KL %.4g, top-1 %.3f, ΔNLL %+.4f -> %s", name, len(rows), summary["kl_mean"]["value"],
             summary["top1"]["value"], summary["nll_delta"]["value"], summary["fidelity_state"])
    return rows, head | facts | {"device": device, "top_k": reference["top_k"], "comparisons": k, "interval_method": METHODS,
                                 "bootstrap_samples": s.bootstrap_samples} | summary


def check_reference(reference: dict[str, Any], params: Params) -> None:
    """The stored reference belongs to this model and these settings (else the fidelity_reference stage is stale)."""
    if reference.get("model") != params.base.model or reference.get("top_k") != params.fidelity.top_k:
        raise InputError(f"data/fidelity reference is for {reference.get('model')} top {reference.get('top_k')}; rerun stages/fidelity_reference.py")


def save_reference(reference: dict[str, Any], path: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, path)


def load_reference(path: Any) -> dict[str, Any]:
    return torch.load(path, weights_only=True)
