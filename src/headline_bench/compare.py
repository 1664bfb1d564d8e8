"""One table across machines: the techniques of several runs (git revisions, DVC experiments, the workspace) side by
side, one column per machine (issue 27).

Which CPU setup wins depends on the machine (compiled_loop_cpu against llama.cpp: 8.0 vs 10.0 ms/token on a Zen 4,
36.7 vs 14.1 on a Zen 3), so a run is only read next to the machine it ran on. Each source's
metrics/techniques/*/{perf,score}.json are read from git (`git show <rev>:<path>`: the metrics are `cache: false`, so
every commit and experiment carries them) or from the working tree (`workspace`). A column is one machine of one
source, named by its environment fingerprint (CPU model, family/model and ISA, or GPU; cores and threads; Python,
torch and transformers); two sources on the same machine get one column each, told apart by the source.

Each cell: time per output token (mean TPOT) and tokens/s with 95% intervals, the ratio of its time per token to the
same column's references (kv_cache and llamacpp by default; ratios never mix machines), peak memory and the quality
state of score.json. Intervals are t intervals over the timed processes (generate.processes) where perf.json has
one number per process, else over the timed rows (labelled: the run-to-run part is then missing).

Writes <out>/comparison.md, comparison.json and comparison.png.
usage: scripts/compare-machines --rev HEAD~1 --rev workspace [--rev <experiment name>] [--all-experiments] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from headline_bench.analysis.stats import clean, finite, t_quantile
from headline_bench.errors import InputError
from headline_bench.files import ROOT, TECHNIQUE_METRICS, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.render.markdown import f, table

WORKSPACE = "workspace"  # the source that is the working tree, not a git revision
CONFIDENCE = 0.95
# what names a machine: hardware, cores and the libraries every technique runs on (env_info keys). Thread settings are
# not in it: a technique may set its own (tensor parallel ranks share the cores), so they are a fact of each cell.
MACHINE_KEYS = ("device", "gpu_count", "cpu", "cpu_id", "cpu_isa", "cpu_count", "python", "torch", "transformers")
THREAD_KEYS = ("torch_threads", "omp_num_threads")
NOT_VERSIONS = ("host", "platform")  # env keys that are neither the machine nor a version (the rest: engine, its build, ...)


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise InputError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def resolve(repo: Path, rev: str) -> str:
    """The commit of a git revision, or of a DVC experiment by name (refs/exps/.../<name>, after `dvc exp pull`)."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    except InputError:
        pass
    refs = [line.split() for line in git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/").splitlines()]
    found = [sha for sha, ref in refs if ref.rsplit("/", 1)[-1] == rev]
    if len(found) != 1:
        raise InputError(f"'{rev}' is neither a git revision nor {'one' if found else 'a'} DVC experiment name in {repo} "
                         f"({len(found)} experiments carry it; `dvc exp pull <remote> <name>` first?)")
    return found[0]


def experiments(repo: Path) -> list[str]:
    """The names of every DVC experiment in the repository (refs/exps)."""
    return [ref.rsplit("/", 1)[-1] for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
            if ref.count("/") >= 4]  # refs/exps/<xx>/<baseline>/<name>; not refs/exps/celery/... or exec refs


def read_source(repo: Path, rev: str) -> dict[str, dict[str, Any]]:
    """{technique: {"perf": perf.json, "score": score.json or {}}} of one source."""
    files: dict[str, str] = {}
    if rev == WORKSPACE:
        for p in sorted((repo / TECHNIQUE_METRICS).glob("*/*.json")):
            files[str(p.relative_to(repo))] = p.read_text()
    else:
        commit = resolve(repo, rev)
        for path in git(repo, "ls-tree", "-r", "--name-only", commit, "--", str(TECHNIQUE_METRICS)).split():
            if path.endswith(("/perf.json", "/score.json")):
                files[path] = git(repo, "show", f"{commit}:{path}")
    out: dict[str, dict[str, Any]] = {}
    for path, text in files.items():
        technique, kind = Path(path).parent.name, Path(path).stem
        if kind in ("perf", "score"):
            out.setdefault(technique, {"perf": {}, "score": {}})[kind] = json.loads(text)
    if not out:
        raise InputError(f"{rev}: no {TECHNIQUE_METRICS}/*/perf.json in {repo}")
    return {t: v for t, v in out.items() if v["perf"]}


def machine(env: dict[str, Any]) -> dict[str, Any]:
    return {k: env.get(k) for k in MACHINE_KEYS}


def isa_class(isa: str | None) -> str:
    """The widest vector extension in env's cpu_isa (what decides the CPU kernels)."""
    flags = set((isa or "").split())
    for name, flag in (("AMX", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16"), ("AVX-512", "avx512f"), ("AVX2", "avx2")):
        if flag in flags:
            return name
    return isa or "?"


def label(m: dict[str, Any]) -> str:
    """One short line naming a machine, for a column header."""
    if (m.get("gpu_count") or 0) > 0:
        hw = f"{m.get('device')} x{m.get('gpu_count')}"
    else:
        ident = str(m.get("cpu_id") or "")
        fam = ident.split(" family ")[-1].split(" stepping")[0].replace(" model ", "/") if " family " in ident else "?"
        hw = f"{m.get('cpu')} (family/model {fam}, {isa_class(m.get('cpu_isa'))}), {m.get('cpu_count')} cores"
    return f"{hw}, torch {m.get('torch')}, transformers {m.get('transformers')}"


def t_interval(point: float, values: list[float]) -> tuple[float, float]:
    """point ± t * sd / sqrt(n) of per-process values (their spread is the run-to-run variance)."""
    v = [x for x in values if finite(x)]
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(v) - 1) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    return point - half, point + half


def with_interval(point: float, per_process: list[Any]) -> tuple[float | None, float | None, str]:
    """The interval of `point` over the timed processes' own values (None without two of them) and its basis."""
    per = [v for v in per_process if finite(v)]
    if len(per) < 2:
        return None, None, "no per-process values: no interval"
    return *t_interval(point, per), f"t interval over {len(per)} timed processes"


def speed(perf: dict[str, Any]) -> dict[str, Any]:
    """TPOT (median and mean, ms) and tokens/s, each with its interval and the interval's basis.

    The median is the headline (a recompiling step or a slow first token in a few rows pulls the mean far off it);
    its interval needs per-process medians (perf.json has them since the timing lock). The mean's interval is over
    processes where perf.json has per-process means, else over the rows (labelled: without the run-to-run part)."""
    procs = perf.get("processes") or []
    out: dict[str, Any] = {}
    if finite(tps := perf.get("tokens_per_s")):
        lo, hi, basis = with_interval(tps, [p.get("tokens_per_s") for p in procs])
        out |= {"tokens_per_s": tps, "tokens_per_s_low": lo, "tokens_per_s_high": hi, "tokens_per_s_basis": basis}
    if finite(p50 := perf.get("tpot_s_p50")):
        lo, hi, basis = with_interval(p50, [p.get("tpot_s_p50") for p in procs])
        out |= {"tpot_ms": p50 * 1e3, "tpot_ms_low": lo and lo * 1e3, "tpot_ms_high": hi and hi * 1e3, "tpot_basis": f"median; {basis}"}
    if finite(mean := perf.get("tpot_s_mean")):
        lo, hi, basis = with_interval(mean, [p.get("tpot_s_mean") for p in procs])
        n, sd = perf.get("tpot_count") or 0, perf.get("tpot_s_stdev")
        if lo is None and n >= 2 and finite(sd):
            half = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)
            lo, hi, basis = mean - half, mean + half, f"t interval over {n} per-row TPOTs (rows only: run-to-run variance not included)"
        out |= {"tpot_mean_ms": mean * 1e3, "tpot_mean_ms_low": lo and lo * 1e3, "tpot_mean_ms_high": hi and hi * 1e3, "tpot_mean_basis": basis}
    return out


def memory(perf: dict[str, Any]) -> dict[str, Any]:
    """The peak memory perf.json has: CUDA allocator, else NVML (engines in another process), else process RSS."""
    for key, kind in (("max_allocated_mb", "CUDA allocator peak"), ("device_used_mb", "GPU memory in use (NVML)"), ("peak_rss_mb", "peak RSS")):
        if finite(perf.get(key)):
            return {"peak_mb": perf[key], "peak_kind": kind}
    return {}


def time_per_token(c: dict[str, Any]) -> tuple[float | None, str]:
    """Median TPOT (ms) where measured, else end-to-end ms per token (1000 / tokens/s: speculative lands several per step)."""
    if finite(c.get("tpot_ms")):
        return c["tpot_ms"], "TPOT"
    if finite(c.get("tokens_per_s")) and c["tokens_per_s"] > 0:
        return 1e3 / c["tokens_per_s"], "end-to-end"
    return None, ""


def ratios(cells: dict[str, dict[str, Any]], refs: list[str]) -> None:
    """Each cell's time per token over each reference's, within one column (one machine). Both sides TPOT where
    both have it, else both end-to-end; < 1: faster per token than the reference on that machine."""
    for c in cells.values():
        for ref in refs:
            r = cells.get(ref, {})
            mine, ref_t = time_per_token(c), time_per_token(r)
            if mine[1] != ref_t[1]:  # one side has no TPOT: compare end-to-end on both
                mine, ref_t = [(1e3 / x["tokens_per_s"], "end-to-end") if finite(x.get("tokens_per_s")) else (None, "") for x in (c, r)]
            if mine[0] is not None and ref_t[0]:
                c[f"vs_{ref}"] = {"ratio": mine[0] / ref_t[0], "basis": mine[1]}


def cell(entry: dict[str, Any]) -> dict[str, Any]:
    perf, score = entry["perf"], entry["score"]
    if perf.get("skipped") or perf.get("failed"):
        return {"outcome": "skipped" if perf.get("skipped") else "failed", "reason": perf.get("skipped") or perf.get("failed")}
    q = {k: score[k] for k in ("quality_state", "rougeL") if k in score}
    env = perf.get("env") or {}
    return {"outcome": "ran", **speed(perf), **memory(perf), **q, "threads": {k: env.get(k) for k in THREAD_KEYS},
            "versions": {k: v for k, v in env.items() if k not in (*MACHINE_KEYS, *THREAD_KEYS, *NOT_VERSIONS)}}


def columns(sources: dict[str, dict[str, dict[str, Any]]], refs: list[str]) -> list[dict[str, Any]]:
    """One column per (source, machine): its cells by technique. A technique without an environment (a skip decided
    before anything ran) goes to every machine of its source."""
    cols: list[dict[str, Any]] = []
    for rev, techniques in sources.items():
        found: dict[str, dict[str, Any]] = {}
        for entry in techniques.values():
            if entry["perf"].get("env"):
                m = machine(entry["perf"]["env"])
                found.setdefault(json.dumps(m, sort_keys=True), m)
        for key, m in found.items():
            cells = {t: cell(e) for t, e in techniques.items() if not e["perf"].get("env") or json.dumps(machine(e["perf"]["env"]), sort_keys=True) == key}
            ratios(cells, refs)
            cols.append({"source": rev, "machine": m, "label": label(m), "cells": cells})
    seen: dict[str, int] = {}
    for c in cols:
        seen[c["label"]] = seen.get(c["label"], 0) + 1
    for i, c in enumerate(cols, 1):
        c["id"] = f"M{i}"
        c["title"] = f"{c['label']} @ {c['source']}" if seen[c["label"]] > 1 else c["label"]
    return cols


def fmt_interval(c: dict[str, Any], key: str, spec: str) -> str:
    if not finite(c.get(key)):
        return "—"
    lo, hi = c.get(f"{key}_low"), c.get(f"{key}_high")
    return f"{f(c[key], spec)} [{f(lo, spec)}, {f(hi, spec)}]" if finite(lo) and finite(hi) else f(c[key], spec)


def usual_threads(col: dict[str, Any]) -> dict[str, Any]:
    """The thread settings most of a column's techniques ran with (the machine's, as opposed to a technique's own)."""
    seen = [json.dumps(x["threads"], sort_keys=True) for x in col["cells"].values() if "threads" in x]
    return json.loads(max(set(seen), key=seen.count)) if seen else {}


def threads_text(t: dict[str, Any]) -> str:
    return f"torch threads {t.get('torch_threads')}, OMP_NUM_THREADS {t.get('omp_num_threads') or 'unset'}"


def markdown(cols: list[dict[str, Any]], refs: list[str], sources: list[str]) -> str:
    techniques = sorted({t for c in cols for t in c["cells"]})
    head = ["technique", *(c["id"] for c in cols)]

    def grid(show: Any) -> str:
        rows = []
        for t in techniques:
            cells = [c["cells"].get(t) for c in cols]
            rows.append([t, *("not in this run" if x is None else x["outcome"] if x["outcome"] != "ran" else show(x) for x in cells)])
        return table(head, rows)

    def tpot(x: dict[str, Any]) -> str:
        return f"{fmt_interval(x, 'tpot_ms', '.2f')}; mean {fmt_interval(x, 'tpot_mean_ms', '.2f')}" if finite(x.get("tpot_ms")) else "—"

    def vs(x: dict[str, Any]) -> str:
        parts = [f"{f(x[f'vs_{r}']['ratio'], '.2f')}{'*' if x[f'vs_{r}']['basis'] != 'TPOT' else ''}" if f"vs_{r}" in x else "—" for r in refs]
        return " / ".join(parts)

    lines = ["# One table across machines", "", f"Sources: {', '.join(f'`{s}`' for s in sources)}. Columns (one machine of one source, "
             "named by its environment fingerprint):", ""]
    for c in cols:
        m = c["machine"]
        lines.append(f"- **{c['id']}**: {c['title']} (source `{c['source']}`; CPU {m.get('cpu_id')}, ISA {m.get('cpu_isa')}; "
                     f"Python {m.get('python')}; {threads_text(usual_threads(c))})")
    for c in cols:
        versions = sorted({f"{k} {v}" for x in c["cells"].values() for k, v in x.get("versions", {}).items() if v is not None})
        lines.append(f"- {c['id']} engines and other versions: {', '.join(versions) or 'none recorded'}")
    own = [f"{c['id']} {t}: {threads_text(x['threads'])}" for c in cols for t, x in c["cells"].items() if "threads" in x and x["threads"] != usual_threads(c)]
    lines += ["", f"Techniques with their own thread settings: {'; '.join(own)}." if own else "Every technique of a column ran with its thread settings.", "",
              f"Intervals: {CONFIDENCE:.0%} t intervals over the timed processes (one number per process) where perf.json has them; the mean "
              "TPOT's falls back to the timed rows (the run-to-run part is then missing). Ratios are within one column, never across machines.", "",
              "## Time per output token, ms (median TPOT [95% CI]; mean [95% CI])", "", grid(tpot), "",
              "## Tokens per second [95% CI]", "", grid(lambda x: fmt_interval(x, "tokens_per_s", ".1f")), "",
              f"## Time per token relative to {' / '.join(refs)} on the same machine (< 1: faster)", "",
              "Median TPOT over median TPOT; `*`: end-to-end time per token on both sides (a side without a TPOT: speculative decoding, prompt lookup).", "",
              grid(vs), "", "## Peak memory, MiB", "", grid(lambda x: f"{f(x.get('peak_mb'), ',.0f')} ({x['peak_kind']})" if "peak_mb" in x else "—"), "",
              "## Quality state (score.json; ROUGE-L)", "",
              grid(lambda x: f"{x.get('quality_state', 'not scored')}" + (f" ({f(x['rougeL'], '.3f')})" if finite(x.get("rougeL")) else ""))]
    missed = [f"- {c['id']} {t}: {x['outcome']}: {x['reason']}" for c in cols for t, x in sorted(c["cells"].items()) if x["outcome"] != "ran"]
    if missed:
        lines += ["", "## Not measured", "", *missed]
    return "\n".join(lines) + "\n"


def plot(cols: list[dict[str, Any]], path: Path) -> None:
    """Grouped horizontal bars: median TPOT (end-to-end ms per token without one) per technique, one bar per column,
    its 95% CI as error bars where perf.json has per-process medians (log scale)."""
    import matplotlib.pyplot as plt

    from headline_bench.render.charts import latency_axis, save

    techniques = sorted({t for c in cols for t, x in c["cells"].items() if time_per_token(x)[0] is not None})
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.35 * max(len(techniques), 1) * max(len(cols), 1)))
    height = 0.8 / max(len(cols), 1)
    values = []
    for i, c in enumerate(cols):
        ys, xs, errs = [], [], [[], []]
        for j, t in enumerate(techniques):
            x = c["cells"].get(t, {})
            value, basis = time_per_token(x)
            if value is None:
                continue
            lo, hi = (x.get("tpot_ms_low"), x.get("tpot_ms_high")) if basis == "TPOT" else (None, None)
            ys.append(j + i * height)
            xs.append(value)
            errs[0].append(value - lo if finite(lo) else 0)
            errs[1].append(hi - value if finite(hi) else 0)
        ax.barh(ys, xs, height=height, xerr=errs, capsize=2, label=f"{c['id']}: {c['title']}")
        values += xs
    latency_axis(ax, values, "ms per output token (median TPOT; end-to-end for techniques without one{}) — lower is better")
    ax.set(yticks=[j + height * (len(cols) - 1) / 2 for j in range(len(techniques))], yticklabels=techniques,
           title="Time per token per technique and machine")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False, fontsize=8)
    save(fig, path)


def compare(repo: Path, revs: list[str], refs: list[str], out: Path) -> dict[str, Any]:
    """Read every source, write comparison.md / .json / .png to `out`; return the JSON."""
    sources = {rev: read_source(repo, rev) for rev in revs}
    cols = columns(sources, refs)
    result = {"sources": revs, "references": refs, "confidence": CONFIDENCE, "machine_keys": list(MACHINE_KEYS), "columns": cols}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", clean(result))
    (out / "comparison.md").write_text(markdown(cols, refs, revs))
    plot(cols, out / "comparison.png")
    log.info("compare: %d sources, %d machine columns -> %s/comparison.{md,json,png}", len(revs), len(cols), out)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", action="append", default=[], help=f"git revision, DVC experiment name or '{WORKSPACE}' (repeat; default: {WORKSPACE})")
    p.add_argument("--all-experiments", action="store_true", help="add every DVC experiment in the repository (after `dvc exp pull`)")
    p.add_argument("--refs", default="kv_cache,llamacpp", help="comma-separated reference techniques for the ratios")
    p.add_argument("--repo", type=Path, default=Path.cwd(), help="the repository (default: the current folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "machines")
    args = p.parse_args(argv)
    setup_logging()
    revs = args.rev + (experiments(args.repo) if args.all_experiments else [])
    try:
        compare(args.repo, revs or [WORKSPACE], args.refs.split(","), args.out)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
