"""Stage quality: one technique (argv[1]) over data/prepared/quality.jsonl, generated once, untimed, batched where the
technique can batch -> data/quality/<technique>.jsonl and metrics/techniques/<technique>/quality.json.
Lossless techniques are not run there: they take their reference's quality once their token ids match (score). They
and their references run the lossless check's further rows as timed (untimed) -> data/lossless/<technique>.jsonl."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)
# isort: split

import sys

from headline_bench.benchmark import check_pass, guarded, quality_pass, write_quality
from headline_bench.errors import fail
from headline_bench.files import QUALITY_ROWS, TIMED_ROWS
from headline_bench.logs import setup_logging
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    name = sys.argv[1] if len(sys.argv) == 2 else fail("usage: python stages/quality.py <technique>")
    params = load_params(required=["base", "generate", "prompt", "techniques", "score"])
    records, facts = guarded(name, params, lambda: quality_pass(name, params, QUALITY_ROWS))
    checked, check_facts = guarded(name, params, lambda: check_pass(name, params, QUALITY_ROWS, TIMED_ROWS))
    write_quality(name, records, facts | ({"lossless_check": check_facts} if check_facts else {}), checked)


if __name__ == "__main__":
    main()
