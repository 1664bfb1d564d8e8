"""One table across machines: the techniques of several runs (git revisions, DVC experiments, the workspace) side by
side, one column per machine (issue 27; docs/sweeps-and-machines.md).

Which CPU setup wins depends on the machine (compiled_loop_cpu against llama.cpp: 8.0 vs 10.0 ms/token on a Zen 4,
36.7 vs 14.1 on a Zen 3), so a run is only read next to the machine it ran on. Each source's
metrics/techniques/*/{perf,score}.json are read from git (`git show <rev>:<path>`: the metrics are `cache: false`, so
every commit and experiment carries them) or from the working tree (`workspace`); analysis/machines.py makes the
cells, render/machines.py the table and chart.

Writes <out>/comparison.md, comparison.json and comparison.png.
usage: scripts/compare-machines --rev HEAD~1 --rev workspace [--rev <experiment name>] [--all-experiments] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from headline_bench.analysis.machines import CONFIDENCE, MACHINE_KEYS, columns
from headline_bench.analysis.stats import clean
from headline_bench.errors import InputError
from headline_bench.files import ROOT, TECHNIQUE_METRICS, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.render.machines import markdown, plot

WORKSPACE = "workspace"  # the source that is the working tree, not a git revision


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
        for path in git(repo, "ls-tree", "-r", "--name-only", commit, "--", str(TECHNIQUE_METRICS)).splitlines():
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
