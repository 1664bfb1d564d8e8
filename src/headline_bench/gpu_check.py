"""The GPU check: the pipeline on random-weight Llama architectures within the lent device time.

Per pass (gpu_check.yaml): prepare and models (config + tokenizer only: weights are built from the seed on the
device), a planner that writes the skips this machine implies without starting a process, one worker process that
imports once and runs the techniques in a clean-state order (a crashed or stuck worker is recorded against its
technique and a new one takes the rest), one technique again in a process of its own to check that sharing the
process does not change TPOT. Scoring and the report (--phase report) need no GPU: run them after the device is
handed back."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from headline_bench.files import ROOT, write_json
from headline_bench.logs import log, setup_logging
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


PROGRESS = Path(".gpu-check")  # in the work folder: the worker's current and finished techniques


def worker(names: list[str], caps: dict[str, int]) -> None:
    """One process for many techniques (`--worker`): torch, transformers and the compiler are imported once; each
    technique builds its own model (a fresh copy: pruning and quantizers never touch another's weights), and the
    compiler's state is reset between techniques."""
    import gc

    import torch

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


def generate_pass(name: str, params: dict[str, Any], work: Path, models: Path, deadline: float, per_technique_s: float,
                  caps: dict[str, int], solo: str | None) -> dict[str, Any]:
    """The device part of one pass: prepare and models in the stage order, the planner's skips, one worker for the
    techniques, the one-process comparison. Returns run facts for run.json."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    link = work / "data" / "models"
    if not link.exists():
        link.symlink_to(models, target_is_directory=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for script in ("prepare.py", "models.py"):
        code, seconds = stage([script], work, max(60.0, deadline - time.time()))
        log.info("gpu-check %s: %s exit %s in %.0f s", name, script, code, seconds)
        if code != 0:  # e.g. the real-weights pass where the model's package is not installed: the other passes go on
            facts = {"pass": name, "failed": f"{script} exited with code {code} (its log above has the error)"}
            write_json(work / "run.json", {**facts, "params": params})
            log.error("gpu-check %s: %s", name, facts["failed"])
            return facts
    start = time.time()
    run, skips = plan(params, work)
    log.info("gpu-check %s: running %s in one worker; skips written without a process: %s", name, run, sorted(skips))
    outcomes = run_worker(run, work, caps, deadline - 20, per_technique_s) if run else {}
    facts = {"pass": name, "order": run, "skips": skips, "outcomes": outcomes, "worker_s": round(time.time() - start, 1)}
    if solo and solo in run and time.time() < deadline - 30:
        facts["solo_check"] = solo_check(solo, work, deadline)
    write_json(work / "run.json", {**facts, "params": params})
    return facts


def report_pass(name: str, work: Path, out: Path) -> None:
    """Scoring and the report (no GPU needed: run it after the device is handed back), then the copy to `out`."""
    facts = json.loads((work / "run.json").read_text()) if (work / "run.json").exists() else {"pass": name}
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    if facts.get("failed"):
        write_json(dest / "run.json", facts)
        return
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


def table(out: Path, names: list[str]) -> str:
    """Batch-1 tokens/s, TPOT and share of the bandwidth peak per pass and technique, for the end of the log."""
    lines = ["| pass | technique | tok/s | TPOT ms | MBU | peak MB | note |", "|---|---|---|---|---|---|---|"]
    for name in names:
        path = out / name / "summary.json"
        if not path.exists():
            continue
        for technique, r in json.loads(path.read_text())["techniques"].items():
            if r.get("skipped"):
                lines.append(f"| {name} | {technique} | | | | | {str(r['skipped'])[:90]} |")
                continue
            tpot = r.get("tpot_s_p50")
            mbu = r.get("bandwidth_share")
            lines.append(f"| {name} | {technique} | {r.get('tokens_per_s') or 0:.1f} | {tpot * 1e3 if tpot else 0:.2f} | "
                         f"{f'{mbu:.1%}' if mbu is not None else 'n/a'} | {r.get('peak_memory_mb') or 0:.0f} | {r.get('compile_mode') or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=Path, default=PASSES, help="overlay file (common + passes)")
    p.add_argument("--only", default="", help="comma-separated pass names (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "metrics" / "gpu", help="results go to <out>/<card>/<pass>/")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh one under /tmp)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the random models (instead of their tokenizer_from)")
    p.add_argument("--budget-s", type=float, default=480, help="the device part's time budget; techniques past it are recorded skips")
    p.add_argument("--per-technique-s", type=float, default=240, help="time limit of one technique in the worker")
    p.add_argument("--phase", choices=["all", "generate", "report"], default="all",
                   help="generate: the device part only; report: scoring and reports of an earlier --work (no GPU needed)")
    p.add_argument("--card", default=None, help="results folder name for --phase report (default: this machine's card)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run these techniques in this process
    p.add_argument("--caps", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_logging()
    if args.worker is not None:
        return worker(args.worker.split(","), json.loads(args.caps))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    deadline = time.time() + args.budget_s
    spec, params = read_yaml_file(args.passes, "--passes"), read_yaml_file(ROOT / "params.yaml", "params.yaml")  # no aliases, like every stage
    names = [n for n in spec["passes"] if not args.only or n in args.only.split(",")]
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    try:
        run_passes(args, spec, params, names, work, deadline)
    finally:
        if args.work is None and args.phase == "all":  # the default scratch (random weights, GBs for an 8B) is this run's own
            shutil.rmtree(work, ignore_errors=True)


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file without anchors or aliases; unreadable or refused: a one-line error naming it."""
    try:
        return read_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {what} {path}: {str(e).splitlines()[0]}") from None


def run_passes(args: argparse.Namespace, spec: dict[str, Any], params: dict[str, Any], names: list[str], work: Path, deadline: float) -> None:
    """The passes' device part (generate) and their scoring and reports, in `work`, results under args.out."""
    out = args.out / slug(args.card or card())
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    log.info("gpu-check on %s: passes %s, phase %s, scratch %s, results -> %s", card(), names, args.phase, work, out)
    if args.phase != "report":
        for i, name in enumerate(names):
            # each pass gets its share of what is left, so a slow first pass cannot starve the next
            shares = [float(spec["passes"][n].get("budget_share", 1.0)) for n in names[i:]]
            until = time.time() + (deadline - time.time()) * shares[0] / sum(shares)
            entry = spec["passes"][name]
            overlay = {k: v for k, v in entry.items() if k not in PASS_KEYS}
            generate_pass(name, pass_params(params, spec.get("common", {}), overlay, args.tokenizer), work / name, models, until,
                          args.per_technique_s, entry.get("row_caps") or {}, entry.get("solo_check"))
    if args.phase != "generate":
        for name in names:
            report_pass(name, work / name, out)
        print(table(out, names))


PASS_KEYS = ("budget_share", "row_caps", "solo_check")  # gpu_check.yaml pass keys that are not params overlays


if __name__ == "__main__":
    main()
