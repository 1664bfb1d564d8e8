"""Stage quality: one technique (argv[1]) over data/prepared/quality.jsonl, generated once, untimed, batched where the
technique can batch -> data/quality/<technique>.jsonl and metrics/techniques/<technique>/quality.json.
Lossless techniques are not run there: they take their reference's quality once their token ids match (score). They
and their references run the lossless check's further rows as timed (untimed) -> data/lossless/<technique>.jsonl.

Both passes run in a child process (`quality.py <technique> --out <file>`), so an engine killed by a signal is the
technique's recorded failure and the pipeline goes on."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import argparse
from pathlib import Path

from headline_bench.benchmark import guarded, quality_process, quality_worker, write_quality
from headline_bench.files import QUALITY_ROWS
from headline_bench.logs import setup_logging
from headline_bench.settings import load_params, stage_key


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("technique", nargs="?", help="default: the one in DVC_STAGE (quality@<technique>), as DVC runs it")
    parser.add_argument("--out", type=Path, help="run the pass in this process and write its result here (started by the stage itself)")
    args = parser.parse_args()
    name = stage_key("quality", args.technique)
    params = load_params(required=["base", "generate", "prompt", "techniques"])  # score: optional (benchmark.checked)
    if args.out is not None:
        return quality_worker(name, params, QUALITY_ROWS, args.out)
    records, facts = guarded(name, params, lambda: quality_process(name, params))
    write_quality(name, records, facts)


if __name__ == "__main__":
    main()
