"""Stage serve_report: metrics/serving/<entry>/serve.json of every `serving` entry -> metrics/serving_report/
(report.md, summary.json, latency-vs-load and goodput-vs-rate charts)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

from headline_bench.files import SERVING_METRICS, SERVING_REPORT, read_json, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.render.serving import render, write_charts
from headline_bench.serving.summary import summarize
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    params = load_params(required=["score", "serve", "serving"])
    names = list(params.serving)
    results = {n: read_json(SERVING_METRICS / n / "serve.json") if (SERVING_METRICS / n / "serve.json").exists()
               else {"entry": n, "skipped": "serve.json missing (stage not run)"} for n in names}
    summary = summarize(names, results, params.serve, params.score)
    SERVING_REPORT.mkdir(parents=True, exist_ok=True)
    write_charts(summary["entries"], summary["slo"], SERVING_REPORT)
    write_json(SERVING_REPORT / "summary.json", summary)
    (SERVING_REPORT / "report.md").write_text("# Serving under load\n\n" + render(summary) + "\n", encoding="utf-8")
    log.info("serve_report: online serving pick %s -> %s", summary["recommendation"]["choice"], SERVING_REPORT)


if __name__ == "__main__":
    main()
