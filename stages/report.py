"""Stage report: metrics/techniques/*/{perf,score}.json, metrics/prepare.json and data/generations ->
metrics/report.md, metrics/summary.json, metrics/focus.json (the DVC metric) and metrics/plots/. Nothing is measured here."""

from __future__ import annotations

from headline_bench.errors import fail
from headline_bench.logs import setup_logging
from headline_bench.render.report import report_from_disk
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    params = load_params(required=["technique", "techniques", "report", "score"])
    if params["technique"] not in params["techniques"]:
        fail(f"params.yaml: technique '{params['technique']}' is not one of techniques ({', '.join(params['techniques'])})")
    report_from_disk(params)


if __name__ == "__main__":
    main()
