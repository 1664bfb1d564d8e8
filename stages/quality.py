"""Stage quality: one technique (argv[1]) over data/prepared/quality.jsonl, generated once, untimed, batched where the
technique can batch -> data/quality/<technique>.jsonl and metrics/techniques/<technique>/quality.json.
Lossless techniques are not run: they take their reference's quality once their timed token ids match (score)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import sys

from headline_bench.benchmark import guarded, quality_pass, write_quality
from headline_bench.errors import fail
from headline_bench.files import QUALITY_ROWS
from headline_bench.logs import setup_logging
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    name = sys.argv[1] if len(sys.argv) == 2 else fail("usage: python stages/quality.py <technique>")
    params = load_params(required=["base", "generate", "prompt", "techniques"])
    records, facts = guarded(name, params, lambda: quality_pass(name, params, QUALITY_ROWS))
    write_quality(name, records, facts)


if __name__ == "__main__":
    main()
