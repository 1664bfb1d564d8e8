"""scripts/bench-decode: the compiled decode loop with cpu_fast's recipe against llama.cpp on the same rows (issue 19).

Each technique runs in its own generate-stage process over the same prepared rows, in a scratch folder that links the
repository's converted models (data/models: `dvc repro models` first), once per round and in alternation (A B A B ...):
on a shared VM the speed of the machine drifts by 10-20% over minutes, and back-to-back processes of one technique
would put that drift into the comparison. Each row's latency and TPOT is its mean over the rounds. Printed and written
to --out: tokens/s and mean TPOT per technique with bootstrap intervals over rows, each round's mean TPOT, and the
paired ratio of TPOTs (target: <= 1, no slower per token than llama.cpp). Timings need a quiet machine: nothing else on
the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from headline_bench.analysis.stats import bootstrap_means, interval, paired_ratio
from headline_bench.files import ROOT, read_jsonl, write_json
from headline_bench.gpu_check import merge, stage
from headline_bench.logs import log, setup_logging
from headline_bench.measure.timing_lock import timed_section


def rate_interval(tokens: list[float], seconds: list[float], samples: int, seed: int) -> tuple[float, float, float]:
    """sum(tokens) / sum(seconds) with a bootstrap interval over rows."""
    dist = bootstrap_means([tokens, seconds], samples, seed)
    return float(sum(tokens) / sum(seconds)), *interval(dist[:, 0] / dist[:, 1], 0.95)


def mean_interval(values: list[float], samples: int, seed: int) -> tuple[float, float, float]:
    return float(np.mean(values)), *interval(bootstrap_means(values, samples, seed)[:, 0], 0.95)


def mean_over_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One technique's rows from several rounds: the first round's rows, each timed row's latency, TTFT and TPOT the
    mean over the rounds, `tpot_s_rounds` each round's TPOT, and `ids_differ` set where greedy decoding did not repeat
    itself (it should: the same prompt in a fresh process)."""
    timed = [{r["id"]: r for r in rows if r.get("tpot_s") is not None} for rows in rounds]
    out = []
    for row in timed[0].values():
        each = [t.get(row["id"]) for t in timed]
        same = [r for r in each if r is not None]
        mean = {k: float(np.mean([r[k] for r in same])) for k in ("latency_s", "ttft_s", "tpot_s")}
        out.append({**row, **mean, "tpot_s_rounds": [r and r["tpot_s"] for r in each],  # None: a round that did not time it
                    "ids_differ": any(r.get("token_ids") != row.get("token_ids") for r in same)})
    return out


def summarize(records: dict[str, list[dict[str, Any]]], samples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Per technique: tokens/s and TPOT with 95% intervals over the rows every technique timed; the paired TPOT ratio
    of the first technique to the second."""
    timed = {name: {r["id"]: r for r in rows if r.get("tpot_s") is not None} for name, rows in records.items()}
    common = sorted(set.intersection(*(set(t) for t in timed.values())))
    out: dict[str, Any] = {"rows": len(common), "techniques": {}}
    for name, rows in timed.items():
        picked = [rows[i] for i in common]
        tps = rate_interval([r["new_tokens"] for r in picked], [r["latency_s"] for r in picked], samples, seed)
        tpot = mean_interval([r["tpot_s"] for r in picked], samples, seed)
        out["techniques"][name] = {"tokens_per_s": tps, "tpot_s": tpot, "new_tokens_mean": float(np.mean([r["new_tokens"] for r in picked]))}
        if all("tpot_s_rounds" in r for r in picked):
            per_round = zip(*(r["tpot_s_rounds"] for r in picked), strict=True)
            out["techniques"][name]["tpot_s_per_round"] = [float(np.mean([t for t in v if t is not None])) for v in per_round]
            out["techniques"][name]["rows_ids_differ_across_rounds"] = sum(r["ids_differ"] for r in picked)
    if len(timed) >= 2 and common:
        first, second = list(timed)[:2]
        out["tpot_ratio"] = {"of": first, "to": second, "ratio": paired_ratio([timed[first][i]["tpot_s"] for i in common],
                                                                             [timed[second][i]["tpot_s"] for i in common], samples, 0.95, seed)}
        rounds = [out["techniques"][n].get("tpot_s_per_round") for n in (first, second)]
        if all(rounds):  # the interval above is over rows; the machine's drift between rounds shows here
            out["tpot_ratio"]["per_round"] = [a / b for a, b in zip(*rounds, strict=True)]
    return out


def markdown(summary: dict[str, Any], facts: dict[str, Any]) -> str:
    lines = [f"# Decode on this CPU: {', '.join(summary['techniques'])}", "",
             f"{summary['rows']} rows timed by every technique, {facts.get('rounds', 1)} alternating rounds of one fresh process "
             f"each; {facts['command']}", "",
             "| technique | tokens/s [95% CI] | TPOT ms [95% CI] | TPOT ms per round | new tokens (mean) |", "|---|---|---|---|---|"]
    for name, t in summary["techniques"].items():
        tps, tpot = t["tokens_per_s"], t["tpot_s"]
        rounds = ", ".join(f"{v * 1e3:.2f}" for v in t.get("tpot_s_per_round", []))
        lines.append(f"| {name} | {tps[0]:.1f} [{tps[1]:.1f}, {tps[2]:.1f}] | {tpot[0] * 1e3:.2f} [{tpot[1] * 1e3:.2f}, {tpot[2] * 1e3:.2f}] "
                     f"| {rounds} | {t['new_tokens_mean']:.1f} |")
    if r := summary.get("tpot_ratio"):
        lo, hi = r["ratio"][1:]
        lines += ["", f"TPOT ratio {r['of']} / {r['to']}: {r['ratio'][0]:.3f} [{lo:.3f}, {hi:.3f}] (paired over rows; <= 1 meets the target)"]
        if r.get("per_round"):
            lines.append(f"per round (each round's mean TPOTs; the machine's drift, which the interval over rows leaves out): "
                         f"{', '.join(f'{v:.3f}' for v in r['per_round'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--techniques", default="compiled_loop_cpu,llamacpp", help="comma-separated; the TPOT ratio is first / second")
    p.add_argument("--rows", type=int, default=100, help="prepare.n")
    p.add_argument("--source", default=None, help="prepare.source (default: params.yaml's, the embedded sample)")
    p.add_argument("--set", action="append", default=[], help="extra params overlay as YAML, e.g. 'prepare: {summary_column: short_description}'")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "decode-cpu")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (A B A B ...), one fresh timed process per technique each")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh one under /tmp)")
    args = p.parse_args(argv)
    setup_logging()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = args.techniques.split(",")
    if unknown := [n for n in names if n not in params["techniques"]]:
        raise SystemExit(f"error: --techniques: {', '.join(unknown)} not in params.yaml's techniques ({', '.join(params['techniques'])})")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds {args.rounds}: at least 1 round is needed")
    models = ROOT / "data" / "models"
    if not (models / "smollm2-135m" / "config.json").exists():
        raise SystemExit(f"error: {models}/smollm2-135m is not converted; run `dvc repro models` first")
    over: dict[str, Any] = {"prepare": {"n": args.rows}}
    for extra in args.set:
        over = merge(over, yaml.safe_load(extra))
    params = merge(params, over)
    params["techniques"] = {n: params["techniques"][n] for n in names}
    params.pop("serving", None)  # serving entries name techniques this run leaves out; it serves nothing
    params["technique"] = names[0]
    params["generate"]["processes"] = 1  # the rounds are the fresh processes, alternated across techniques
    source = Path(args.source or params["prepare"]["source"])
    params["prepare"]["source"] = str(source if source.is_absolute() else (Path.cwd() if args.source else ROOT) / source)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-decode-{os.getpid()}"
    try:
        run_rounds(args, argv, params, names, work, models)
    finally:
        if args.work is None:  # the default scratch folder is this run's own: removed however the run ends
            shutil.rmtree(work, ignore_errors=True)


def run_rounds(args: argparse.Namespace, argv: list[str] | None, params: dict[str, Any], names: list[str], work: Path, models: Path) -> None:
    """Prepare the rows in `work`, time the techniques in alternating rounds and write the summary and report."""
    (work / "data").mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "models").exists():
        (work / "data" / "models").symlink_to(models, target_is_directory=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code, _ = stage(["prepare.py"], work, 600)
    if code != 0:
        raise SystemExit(f"error: bench-decode: prepare failed (exit {code})")
    rounds: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    with timed_section("bench-decode") as lock:  # the alternation is the comparison: no other timed work between rounds
        for k in range(args.rounds):
            for name in names:
                code, seconds = stage(["generate.py", name], work, 3600)
                log.info("bench-decode: round %d of %d: %s exit %s in %.0f s", k + 1, args.rounds, name, code, seconds)
                if code != 0:
                    raise SystemExit(f"error: bench-decode: {name} failed (exit {code})")
                perf = json.loads((work / "metrics" / "techniques" / name / "perf.json").read_text())
                if perf.get("skipped") or perf.get("failed"):
                    raise SystemExit(f"error: bench-decode: {name} not timed: {perf.get('skipped') or perf.get('failed')}")
                rounds[name].append(read_jsonl(work / "data" / "generations" / f"{name}.jsonl"))
    perf = {n: json.loads((work / "metrics" / "techniques" / n / "perf.json").read_text()) for n in names}  # the last round's
    summary = summarize({n: mean_over_rounds(rows) for n, rows in rounds.items()})
    facts = {"command": "scripts/bench-decode " + " ".join(argv if argv is not None else os.sys.argv[1:]), "rounds": args.rounds,
             "env": perf[names[0]].get("env"), "threads": {n: perf[n].get("threads") or perf[n].get("env", {}).get("torch_threads") for n in names},
             "warmup_runs": params["generate"]["warmup_runs"], "repeats": params["generate"].get("repeats", 1), "timing_lock": lock.facts()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", {**summary, **facts, "perf": {n: {k: perf[n].get(k) for k in ("tpot_s_p50", "ttft_s_p50", "tokens_per_s",
                                                                                                      "weight_mb", "compile_s", "timing_check")} for n in names}})
    text = markdown(summary, facts)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
