"""Stage generate: one technique (argv[1]) over data/prepared/timed.jsonl in `generate.processes` fresh timed processes ->
data/generations/<technique>.jsonl (per-row predictions and latencies) and metrics/techniques/<technique>/perf.json.

`python stages/generate.py <technique>` (as DVC runs it) holds the technique's lock, starts the processes one after
another and merges them; each is `python stages/generate.py <technique> --process k --out <file>` (tensor parallel:
under torchrun)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import argparse
from pathlib import Path

from headline_bench.benchmark import guarded, run_processes, timed_process, write_outputs
from headline_bench.errors import InputError, fail
from headline_bench.files import TIMED_ROWS
from headline_bench.logs import setup_logging
from headline_bench.measure import checkpoints
from headline_bench.settings import load_params, stage_key


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("technique", nargs="?", help="default: the one in DVC_STAGE (generate@<technique>), as DVC runs it")
    parser.add_argument("--process", type=int, help="run timed process k in this process (started by the stage itself)")
    parser.add_argument("--out", type=Path, help="where timed process k writes its records and perf")
    args = parser.parse_args()
    name = stage_key("generate", args.technique)
    params = load_params(required=["base", "generate", "prompt", "techniques"])
    if args.process is not None:
        return timed_process(name, params, TIMED_ROWS, args.process, args.out)
    try:
        with checkpoints.exclusive(name):  # one run of a technique at a time (its checkpoint and outputs); its processes inherit it
            records, perf = guarded(name, params, lambda: run_processes(name, params, TIMED_ROWS))
            write_outputs(name, records, perf)
            checkpoints.clear(name)
    except InputError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
