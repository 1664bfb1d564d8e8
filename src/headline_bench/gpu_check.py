"""The GPU check: the pipeline on random-weight Llama architectures within the lent device time.

Per pass (gpu_check.yaml): prepare and models (config + tokenizer only: weights are built from the seed on the
device), a planner that writes the skips this machine implies without starting a process, one worker process that
imports once and runs the techniques in a clean-state order (a crashed or stuck worker is recorded against its
technique and a new one takes the rest), one technique again in a process of its own to check that sharing the
process does not change TPOT. Before any of it, `plan_passes` fills --budget-s from the yaml's per-technique costs:
techniques named in --redo first, then those this card has no results for (metrics/gpu/<card>/); the rest is left
out and said so in plan.json and run.json. Scoring and the report (--phase report) need no GPU: run them after the
device is handed back.

On the lent machine of this workplace (8 minutes of device time: ~1.5 min start, the wheels' install, 330 s of
plan, the trip back), prepared here first: wheels of transformers 5.24.0, torchao 0.18.0 and bitsandbytes 0.50.2 in
.whl/ and SmolLM2's tokenizer files in .gpu/tokenizer/ (both in .git/info/exclude; docs/gpu.md says how), the
device tool's `run` with carry [".whl", ".gpu"] and timeout_s 450:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && set -o pipefail && bash scripts/gpu-check --phase generate --tokenizer .gpu/tokenizer --work /tmp/gpu-work --export $OUT/gpu-work.tar.gz --redo compiled_loop,static_compile 2>&1 | tee $OUT/gpu-check.log

then here, on the CPU (files_at: where the device tool put $OUT's files; the card as the log's first line names it):

    mkdir -p /tmp/gpu-work && tar -xzf <files_at>/gpu-work.tar.gz -C /tmp/gpu-work && scripts/gpu-check --phase report --work /tmp/gpu-work --card nvidia-h200
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from headline_bench.files import ROOT, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.measure.timing_lock import timed_section
from headline_bench.settings import read_yaml

STAGES = ROOT / "stages"


PASSES = Path(__file__).with_name("gpu_check.yaml")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, dicts merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def pass_params(params: dict[str, Any], common: dict[str, Any], spec: dict[str, Any], tokenizer: str | None) -> dict[str, Any]:
    """params.yaml for one pass: the overlay applied, techniques narrowed and ordered, repo paths made absolute."""
    spec = dict(spec)
    wanted = spec.pop("techniques", "all")
    out = merge(merge(params, common), spec)
    if wanted != "all":
        unknown = sorted(set(wanted) - set(out["techniques"]))
        if unknown:
            raise SystemExit(f"error: gpu-check: unknown technique(s) {unknown}")
        out["techniques"] = {name: copy.deepcopy(out["techniques"][name]) for name in wanted}
        for name, entry in out["techniques"].items():
            if (entry or {}).get("reference") not in (None, *wanted):  # its reference does not run in this pass: no token check
                log.info("gpu-check: %s's reference %s is not in this pass; its outputs are not compared", name, entry.pop("reference"))
        for entry in (out.get("serving") or {}).values():  # a serving entry's offline reference must be a technique of the pass
            if entry.get("reference") not in (None, *wanted):
                entry.pop("reference")
        if out.get("technique") not in out["techniques"]:  # the report focuses on a technique the pass runs
            out["technique"] = wanted[0]
    source = Path(out["prepare"]["source"])
    if not source.is_absolute() and not str(source).startswith("hub:"):
        out["prepare"]["source"] = str(ROOT / source)
    for entry in out["models"].values():
        if "config" in entry and not Path(entry["config"]).is_absolute():
            entry["config"] = str(ROOT / entry["config"])
        if "config" in entry and tokenizer:
            entry["tokenizer_from"] = str(Path(tokenizer).resolve())
    return out


def stage(args: list[str], cwd: Path, timeout: float) -> tuple[int | None, float]:
    """Run one stage script in `cwd`; (exit code or None on time-out, seconds)."""
    start = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, str(STAGES / args[0]), *args[1:]], cwd=cwd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = None
    return code, time.perf_counter() - start


def record(work: Path, name: str, outcome: str, reason: str) -> None:
    """A skip or failure that the orchestrator itself decides (time limits, a crashed worker), in the perf.json the
    stages read."""
    write_json(work / "metrics" / "techniques" / name / "perf.json", {"technique": name, outcome: reason})
    (work / "data" / "generations").mkdir(parents=True, exist_ok=True)
    (work / "data" / "generations" / f"{name}.jsonl").write_text("")


@contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working directory (the pipeline's paths are relative to a repository root)."""
    here = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def kind(entry: dict[str, Any]) -> int:
    """Run order that keeps a shared process's state clean: techniques that keep the weights as they are first, then
    compiled ones, then pruning (on its own freshly built model), then quantizers, then other engines (vLLM keeps its
    memory pool; tensor parallel starts its own ranks)."""
    entry = entry or {}
    if entry.get("engine", "transformers") != "transformers" or entry.get("parallel"):
        return 4
    if entry.get("quantize"):
        return 3
    if entry.get("prune"):
        return 2
    if entry.get("compile") or entry.get("decode_loop"):
        return 1
    return 0


def plan(params: dict[str, Any], work: Path) -> tuple[list[str], dict[str, str]]:
    """Which techniques this machine runs (in a clean-state order) and which are skips, decided here, in this process:
    a skip is written at once, without starting a process for it.

    Returns:
        (techniques to run in the worker, {technique: skip reason}).
    """
    from headline_bench.benchmark import settle, write_outputs
    from headline_bench.errors import Skip
    from headline_bench.settings import parse
    from headline_bench.techniques.config import check_hardware

    typed = parse(params)
    run, skips = [], {}
    with inside(work):
        for name in params["techniques"]:
            cfg, device = settle(typed, name)
            try:
                check_hardware(cfg, device)
            except Skip as e:
                skips[name] = str(e)
                write_outputs(name, [], {"technique": name, "config": cfg.record(), "device": device, "skipped": str(e)})
                continue
            run.append(name)
    run.sort(key=lambda name: kind(params["techniques"][name]))  # stable: the pass's order within a kind
    return run, skips


@dataclass
class Plan:
    """What the device part will run: per pass the techniques (in the pass's order) and its planned seconds; what it
    leaves out and why (already measured on this card, over the budget, a package the pass needs)."""

    runs: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"runs": self.runs, "seconds": self.seconds, "planned_s": sum(self.seconds.values()), "left_out": self.left_out}


def plan_passes(spec: dict[str, Any], params: dict[str, Any], budget_s: float, measured: dict[str, set[str]], redo: set[str],
                have: Callable[[str], bool]) -> Plan:
    """Fill the device budget from gpu_check.yaml's per-technique costs, most wanted first: the techniques named in
    `redo` (with their references) in every pass, then the ones not yet measured on this card (with theirs). A pass's
    setup_s is paid by its first technique; one that does not fit what is left is left out, never cut mid-way.

    Args:
        spec: gpu_check.yaml (passes with techniques, costs, setup_s, needs; default_cost_s).
        params: params.yaml (each technique's reference).
        budget_s: device seconds for the generation part.
        measured: {pass: techniques with results on this card already}.
        redo: techniques to measure again even where measured ("all": every one).
        have: whether a Python package is importable (a pass's `needs`).
    """
    plan = Plan()
    tiers: list[list[tuple[str, str]]] = [[], []]
    for name, entry in spec["passes"].items():
        plan.left_out[name] = {}
        if entry.get("needs") and not have(entry["needs"]):
            plan.left_out[name] = {t: f"the pass needs the {entry['needs']} package (carry its wheel)" for t in entry["techniques"]}
            continue
        for technique in entry["techniques"]:
            if technique in redo or "all" in redo:
                tier = 0
            elif technique in measured.get(name, set()):
                plan.left_out[name][technique] = "already measured on this card (--redo to measure it again)"
                continue
            else:
                tier = 1
            reference = (params["techniques"].get(technique) or {}).get("reference")
            wanted = [technique] + ([reference] if reference in entry["techniques"] else [])
            tiers[tier] += [(name, t) for t in wanted if (name, t) not in tiers[0] + tiers[tier]]
    spent = 0.0
    for name, technique in tiers[0] + tiers[1]:
        entry = spec["passes"][name]
        cost = float(entry.get("costs", {}).get(technique, spec.get("default_cost_s", DEFAULT_COST_S)))
        cost += 0.0 if name in plan.runs else float(entry.get("setup_s", 0))
        if technique in plan.runs.get(name, []):
            continue
        if spent + cost > budget_s:
            plan.left_out[name][technique] = f"over the budget: ~{cost:.0f} s planned, {budget_s - spent:.0f} s of {budget_s:.0f} left"
            continue
        spent += cost
        plan.runs.setdefault(name, []).append(technique)
        plan.seconds[name] = plan.seconds.get(name, 0.0) + cost
        plan.left_out[name].pop(technique, None)
    for name in plan.runs:  # the pass's own order (the worker sorts by kind, stable within one)
        plan.runs[name] = [t for t in spec["passes"][name]["techniques"] if t in plan.runs[name]]
    return plan


DEFAULT_COST_S = 45.0  # a technique gpu_check.yaml gives no cost for (and no default_cost_s)


def measured_on(out: Path, name: str) -> set[str]:
    """Techniques with results of an earlier run on this card: an entry that is not a skip or a failure in any
    summary.json under <out>/<pass>/ (the pass's folder and its later runs' subfolders)."""
    done: set[str] = set()
    for path in (out / name).rglob("summary.json") if (out / name).exists() else []:
        techniques = json.loads(path.read_text()).get("techniques", {})
        done |= {t for t, r in techniques.items() if not r.get("skipped") and not r.get("failed")}
    return done


def importable(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None



PROGRESS = Path(".gpu-check")  # in the work folder: the worker's current and finished techniques


def worker(names: list[str], caps: dict[str, int]) -> None:
    """One process for many techniques (`--worker`): torch, transformers and the compiler are imported once; each
    technique builds its own model (a fresh copy: pruning and quantizers never touch another's weights), and the
    compiler's state (compiled frames, CUDA graph pools, inductor's process-wide options) is reset between techniques."""
    import gc

    import torch

    from headline_bench.backends.compiled_loop import inductor_restored
    from headline_bench.benchmark import failure, generate, write_outputs
    from headline_bench.errors import Skip
    from headline_bench.files import TIMED_ROWS, read_jsonl
    from headline_bench.settings import load_params

    params = load_params(required=["base", "generate", "prompt", "techniques"])
    rows = read_jsonl(TIMED_ROWS)
    PROGRESS.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        (PROGRESS / "current").write_text(name)
        try:
            with inductor_restored():  # one technique's decode_loop.inductor options never reach the next one's compile
                records, perf = generate(name, params, rows[: caps.get(name, len(rows))])
        except Skip as e:
            records, perf = [], {"technique": name, "skipped": str(e)}
        except Exception as e:  # recorded like the generate stage does; the next technique still runs
            log.exception("%s failed", name)
            records, perf = [], failure(name, params, e)
        perf["shared_process"] = {"shared": True, "pid": os.getpid(), "techniques_before_in_process": i,
                           "row_cap": caps.get(name)}
        write_outputs(name, records, perf)
        with open(PROGRESS / "done", "a") as f:
            f.write(name + "\n")
        torch._dynamo.reset()  # compiled frames, guards and CUDA graph pools of this technique
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_worker(names: list[str], work: Path, caps: dict[str, int], deadline: float, per_technique_s: float) -> dict[str, Any]:
    """Run `names` in one worker process; a crashed or stuck worker is recorded against the technique it was running
    and a new worker takes the rest. Returns {technique: outcome}."""
    outcomes: dict[str, Any] = {}
    left = list(names)
    progress = work / PROGRESS
    while left:
        shutil.rmtree(progress, ignore_errors=True)
        argv = [sys.executable, "-m", "headline_bench.gpu_check", "--worker", ",".join(left), "--caps", json.dumps(caps)]
        proc = subprocess.Popen(argv, cwd=work)
        started, current, code = time.time(), None, None
        while (code := proc.poll()) is None:
            time.sleep(0.5)
            now = (progress / "current").read_text() if (progress / "current").exists() else None
            if now != current:
                current, started = now, time.time()
            if time.time() - started > per_technique_s or time.time() > deadline:
                proc.kill()
                proc.wait()
                break
        done = (progress / "done").read_text().split() if (progress / "done").exists() else []
        outcomes.update({name: "ran (shared worker)" for name in done})
        left = [n for n in left if n not in done]
        if not left:
            break
        stuck = (progress / "current").read_text() if (progress / "current").exists() else left[0]
        if code is None:
            reason = "not run: the gpu-check time budget was spent" if time.time() > deadline else f"timed out after {per_technique_s:.0f} s (gpu-check per-technique limit)"
        else:
            reason = f"the worker process exited with code {code} while running it (its log above has the error)"
        record(work, stuck, "skipped" if time.time() > deadline else "failed", reason)
        outcomes[stuck] = reason
        left = [n for n in left if n != stuck]
        if time.time() > deadline - 30:
            for name in left:
                record(work, name, "skipped", "not run: the gpu-check time budget was spent")
                outcomes[name] = "not run (budget)"
            break
        log.info("gpu-check: %s: %s; a new worker runs the remaining %s", stuck, reason, left)
    return outcomes


def solo_check(name: str, work: Path, deadline: float) -> dict[str, Any]:
    """TPOT of one technique in a process of its own (the generate stage), against its shared-worker run: the shared
    process must not change what is timed. The shared run's outputs are kept."""
    perf_path = work / "metrics" / "techniques" / name / "perf.json"
    gens_path = work / "data" / "generations" / f"{name}.jsonl"
    if not perf_path.exists() or "tpot_s_p50" not in (shared := json.loads(perf_path.read_text())):
        return {"technique": name, "result": "n/a: no shared-worker TPOT to compare"}
    kept = perf_path.read_bytes(), gens_path.read_bytes()
    code, seconds = stage(["generate.py", name], work, max(30.0, deadline - time.time()))
    solo = json.loads(perf_path.read_text()) if code == 0 else {}
    perf_path.write_bytes(kept[0])
    gens_path.write_bytes(kept[1])
    if "tpot_s_p50" not in solo:
        return {"technique": name, "result": f"n/a: the one-process run exited with {code}"}
    ratio = shared["tpot_s_p50"] / solo["tpot_s_p50"]
    return {"technique": name, "shared_tpot_s_p50": shared["tpot_s_p50"], "solo_tpot_s_p50": solo["tpot_s_p50"],
            "shared_over_solo": ratio, "agrees": abs(ratio - 1) <= SOLO_TOLERANCE, "tolerance": SOLO_TOLERANCE,
            "solo_process_s": round(seconds, 1)}


SOLO_TOLERANCE = 0.05  # shared-worker TPOT within 5% of the one-process run: sharing the process changed nothing timed


def link_models(work: Path, models: Path) -> None:
    """<pass>/data/models -> the run's shared models folder (built once for every pass; re-made after an export)."""
    (work / "data").mkdir(parents=True, exist_ok=True)
    link = work / "data" / "models"
    if link.is_symlink() and not link.exists():
        link.unlink()
    if not link.exists():
        link.symlink_to(models.resolve(), target_is_directory=True)


def generate_pass(name: str, params: dict[str, Any], work: Path, models: Path, deadline: float, per_technique_s: float,
                  caps: dict[str, int], solo: str | None, left_out: dict[str, str]) -> dict[str, Any]:
    """The device part of one pass: prepare and models in the stage order, the planner's skips, one worker for the
    techniques, the one-process comparison. Returns run facts for run.json (with what the plan left out)."""
    work.mkdir(parents=True, exist_ok=True)
    link_models(work, models)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    for script in ("prepare.py", "models.py"):
        code, seconds = stage([script], work, max(60.0, deadline - time.time()))
        log.info("gpu-check %s: %s exit %s in %.0f s", name, script, code, seconds)
        if code != 0:  # e.g. the real-weights pass where the model's package is not installed: the other passes go on
            facts = {"pass": name, "started": started, "failed": f"{script} exited with code {code} (its log above has the error)"}
            write_json(work / "run.json", {**facts, "params": params})
            log.error("gpu-check %s: %s", name, facts["failed"])
            return facts
    start = time.time()
    run, skips = plan(params, work)
    log.info("gpu-check %s: running %s in one worker; skips written without a process: %s", name, run, sorted(skips))
    outcomes = run_worker(run, work, caps, deadline - 20, per_technique_s) if run else {}
    facts = {"pass": name, "started": started, "order": run, "skips": skips, "outcomes": outcomes,
             "worker_s": round(time.time() - start, 1), "left_out_by_plan": left_out}
    if solo and solo in run and time.time() < deadline - 30:
        facts["solo_check"] = solo_check(solo, work, deadline)
    write_json(work / "run.json", {**facts, "params": params})
    return facts


def destination(out: Path, name: str, started: str) -> Path:
    """<out>/<pass>/ for a pass's first run on this card; a later run goes to <out>/<pass>/<started>/ beside it, so the
    earlier results (which the planner counts as measured and left out) stay where they are."""
    first = out / name
    prior = first / "run.json"
    same = prior.exists() and json.loads(prior.read_text()).get("started") == started
    return first if same or not (first / "summary.json").exists() else first / started


def report_pass(name: str, work: Path, models: Path, out: Path) -> Path:
    """Scoring and the report (no GPU needed: run it after the device is handed back), then the copy to `out`.
    Returns the folder the results went to."""
    facts = json.loads((work / "run.json").read_text())
    dest = destination(out, name, facts.get("started", "unknown"))
    dest.mkdir(parents=True, exist_ok=True)
    if facts.get("failed"):
        write_json(dest / "run.json", facts)
        return dest
    link_models(work, models)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for technique in params["techniques"]:
        stage(["score.py", technique], work, 300)
    code, _ = stage(["report.py"], work, 300)
    for item in ("metrics/report.md", "metrics/summary.json"):
        if (work / item).exists():
            shutil.copy(work / item, dest / Path(item).name)
    if (work / "metrics" / "plots").exists():
        shutil.copytree(work / "metrics" / "plots", dest / "plots", dirs_exist_ok=True)
    write_json(dest / "run.json", {**facts, "report_exit": code})
    return dest


EXPORT_SKIP = {".safetensors", ".gguf", ".bin", ".pt"}  # weights: built on the device from a seed, or converted there


def export(work: Path, archive: Path) -> None:
    """Pack the work folder for the trip back from the device (one file: the device tool returns few): every pass's
    params, run facts, perf.json and generations, the models' configs and tokenizers; no weights, no links."""
    import tarfile

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        skip = info.issym() or Path(info.name).suffix in EXPORT_SKIP or PROGRESS.name in Path(info.name).parts
        return None if skip else info

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(work, arcname=".", filter=keep)
    log.info("gpu-check: results packed into %s (%.1f MB)", archive, archive.stat().st_size / 2**20)


TIMED_EVENTS = {"recompiles_in_timed_run": "recompiles", "cudagraph_skips_in_timed_run": "CUDA graph skips"}  # 0 expected


def table(results: dict[str, Path]) -> str:
    """Batch-1 tokens/s, TPOT and share of the bandwidth peak per pass and technique, for the end of the log.

    Args:
        results: {pass: the folder its report went to}."""
    lines = ["| pass | technique | tok/s | TPOT ms | MBU | peak MB | note |", "|---|---|---|---|---|---|---|"]
    for name, folder in results.items():
        path = folder / "summary.json"
        if not path.exists():
            continue
        for technique, r in json.loads(path.read_text())["techniques"].items():
            if r.get("skipped"):
                lines.append(f"| {name} | {technique} | | | | | {str(r['skipped'])[:90]} |")
                continue
            tpot = r.get("tpot_s_p50")
            mbu = r.get("bandwidth_share")
            events = [f"{r[k]} {label} in the timed run" for k, label in TIMED_EVENTS.items() if r.get(k)]
            note = "; ".join([r.get("compile_mode") or "", *events]).strip("; ")
            lines.append(f"| {name} | {technique} | {r.get('tokens_per_s') or 0:.1f} | {tpot * 1e3 if tpot else 0:.2f} | "
                         f"{f'{mbu:.1%}' if mbu is not None else 'n/a'} | {r.get('peak_memory_mb') or 0:.0f} | {note} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=Path, default=PASSES, help="overlay file (common + passes)")
    p.add_argument("--only", default="", help="comma-separated pass names (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "metrics" / "gpu", help="results go to <out>/<card>/<pass>/")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh one under /tmp; never under $OUT)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the random models (instead of their tokenizer_from)")
    p.add_argument("--budget-s", type=float, default=330, help="the device part's time budget, planned from gpu_check.yaml's costs")
    p.add_argument("--per-technique-s", type=float, default=240, help="time limit of one technique in the worker")
    p.add_argument("--redo", default="", help="comma-separated techniques to measure again where this card has results ('all': every one)")
    p.add_argument("--phase", choices=["all", "generate", "report"], default="all",
                   help="generate: the device part only; report: scoring and reports of an earlier --work (no GPU needed)")
    p.add_argument("--export", type=Path, default=None, help="--phase generate: pack the work folder's results (no weights) into this .tar.gz")
    p.add_argument("--card", default=None, help="results folder name for --phase report (default: this machine's card)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run these techniques in this process
    p.add_argument("--caps", default="{}", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging()
    if args.worker is not None:
        return worker(args.worker.split(","), json.loads(args.caps))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    deadline = time.time() + args.budget_s
    spec, params = read_yaml_file(args.passes, "--passes"), read_yaml_file(ROOT / "params.yaml", "params.yaml")  # no aliases, like every stage
    spec["passes"] = {n: e for n, e in spec["passes"].items() if not args.only or n in args.only.split(",")}
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    if os.environ.get("OUT") and work.resolve().is_relative_to(Path(os.environ["OUT"]).resolve()):
        raise SystemExit(f"error: gpu-check: scratch {work} is under $OUT (model builds and caches would travel back); use --export")
    try:
        run_passes(args, spec, params, work, deadline)
    finally:
        if args.work is None and args.phase == "all":  # the default scratch (random weights, GBs for an 8B) is this run's own
            shutil.rmtree(work, ignore_errors=True)


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file without anchors or aliases; unreadable or refused: a one-line error naming it."""
    try:
        return read_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {what} {path}: {str(e).splitlines()[0]}") from None


def run_passes(args: argparse.Namespace, spec: dict[str, Any], params: dict[str, Any], work: Path, deadline: float) -> None:
    """The passes' device part (generate, planned within the budget) and their scoring and reports, in `work`; results under args.out."""
    out = args.out / slug(args.card or card())
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    if args.phase != "report":
        with timed_section("gpu-check"):  # the device part; its worker and solo processes find the lock held by this one
            measured = {name: measured_on(out, name) for name in spec["passes"]}
            plan = plan_passes(spec, params, args.budget_s, measured, set(filter(None, args.redo.split(","))), importable)
            write_json(work / "plan.json", {"budget_s": args.budget_s, "card": out.name, **plan.record()})
            log.info("gpu-check on %s: plan %s (%.0f s of %.0f), left out %s; scratch %s", card(), plan.runs, sum(plan.seconds.values()),
                     args.budget_s, {n: sorted(t) for n, t in plan.left_out.items() if t}, work)
            names = list(plan.runs)
            for i, name in enumerate(names):
                until = deadline - sum(plan.seconds[n] for n in names[i + 1 :])  # the later passes keep their planned seconds
                entry = spec["passes"][name]
                overlay = {k: v for k, v in entry.items() if k not in PASS_KEYS} | {"techniques": plan.runs[name]}
                generate_pass(name, pass_params(params, spec.get("common", {}), overlay, args.tokenizer), work / name, models, until,
                              args.per_technique_s, entry.get("row_caps") or {}, entry.get("solo_check"), plan.left_out[name])
            if args.export:
                export(work, args.export)
    if args.phase != "generate":
        results = {n: report_pass(n, work / n, models, out) for n in spec["passes"] if (work / n / "run.json").exists()}
        print(table(results))


PASS_KEYS = ("row_caps", "solo_check", "setup_s", "costs", "needs")  # gpu_check.yaml pass keys that are not params overlays


if __name__ == "__main__":
    main()
