"""Stage report: metrics/techniques/*/{perf,score}.json, metrics/prepare.json and data/generations ->
metrics/report.md, metrics/summary.json, metrics/focus.json (the DVC metric) and metrics/plots/. Nothing is measured here."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

from headline_bench.logs import setup_logging
from headline_bench.render.report import report_from_disk
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    report_from_disk(load_params(required=["technique", "techniques", "report", "score"]))


if __name__ == "__main__":
    main()
