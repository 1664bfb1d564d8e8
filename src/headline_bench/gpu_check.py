"""gpu_check"""

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
    """A skip or failure that the orchestrator itself decides (time limits), in the perf.json the stages read."""
    write_json(work / "metrics" / "techniques" / name / "perf.json", {"technique": name, outcome: reason})
    (work / "data" / "generations").mkdir(parents=True, exist_ok=True)
    (work / "data" / "generations" / f"{name}.jsonl").write_text("")


def run_pass(name: str, params: dict[str, Any], work: Path, models: Path, out: Path, deadline: float, per_technique_s: float) -> dict[str, Any]:
    """One pass: the stages in dvc.yaml's order in `work`; copies the results to `out`. Returns {technique: seconds or outcome}."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    link = work / "data" / "models"
    if not link.exists():
        link.symlink_to(models, target_is_directory=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for script in ("prepare.py", "models.py"):
        code, seconds = stage([script], work, max(60.0, deadline - time.time()))
        log.info("gpu-check %s: %s exit %s in %.0f s", name, script, code, seconds)
        if code != 0:
            raise SystemExit(f"error: gpu-check {name}: {script} failed (exit {code})")
    timings: dict[str, Any] = {}
    for technique in params["techniques"]:
        left = deadline - time.time()
        if left < 45:  # leave time for scoring and the report
            record(work, technique, "skipped", "not run: the gpu-check time budget was spent")
            timings[technique] = "not run (budget)"
            continue
        limit = min(per_technique_s, left - 30)
        code, seconds = stage(["generate.py", technique], work, limit)
        if code is None:
            record(work, technique, "failed", f"timed out after {limit:.0f} s (gpu-check per-technique limit)")
        elif code != 0:
            record(work, technique, "failed", f"generate exited with code {code} (its log above has the error)")
        timings[technique] = round(seconds, 1)
        log.info("gpu-check %s: %s done in %.0f s (exit %s)", name, technique, seconds, code)
    for technique in params["techniques"]:
        stage(["score.py", technique], work, 300)
    code, _ = stage(["report.py"], work, 300)
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("metrics/report.md", "metrics/summary.json"):
        if (work / item).exists():
            shutil.copy(work / item, dest / Path(item).name)
    if (work / "metrics" / "plots").exists():
        shutil.copytree(work / "metrics" / "plots", dest / "plots", dirs_exist_ok=True)
    write_json(dest / "run.json", {"pass": name, "stage_seconds": timings, "report_exit": code, "params": params})
    return timings


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
    p.add_argument("--budget-s", type=float, default=510, help="the whole run's time budget; techniques past it are recorded skips")
    p.add_argument("--per-technique-s", type=float, default=240, help="time limit of one technique's generate stage")
    args = p.parse_args(argv)
    setup_logging()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    deadline = time.time() + args.budget_s
    spec = read_yaml(args.passes.read_text())
    params = read_yaml((ROOT / "params.yaml").read_text())  # no aliases, like every stage
    names = [n for n in spec["passes"] if not args.only or n in args.only.split(",")]
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    out = args.out / slug(card())
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    log.info("gpu-check on %s: passes %s, scratch %s, results -> %s", card(), names, work, out)
    for i, name in enumerate(names):
        # each pass gets its share of what is left, so a slow first pass cannot starve the next
        shares = [float(spec["passes"][n].get("budget_share", 1.0)) for n in names[i:]]
        until = time.time() + (deadline - time.time()) * shares[0] / sum(shares)
        overlay = {k: v for k, v in spec["passes"][name].items() if k != "budget_share"}
        run_pass(name, pass_params(params, spec.get("common", {}), overlay, args.tokenizer), work / name, models, out, until, args.per_technique_s)
    print(table(out, names))


if __name__ == "__main__":
    main()
