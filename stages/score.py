"""Stage score: one technique's generations (argv[1]) -> metrics/techniques/<technique>/score.json (ROUGE with intervals,
paired ΔROUGE-L against baseline, lossless check against its reference)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import sys

from headline_bench.errors import InputError, fail
from headline_bench.files import TECHNIQUE_METRICS, read_json, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.quality.records import outcome_score
from headline_bench.settings import load_params, stage_key


def main() -> None:
    setup_logging()
    name = stage_key("score", sys.argv[1] if len(sys.argv) == 2 else None)
    params = load_params(required=["base", "score", "techniques"])
    out = TECHNIQUE_METRICS / name / "score.json"
    try:
        result = outcome_score(name, read_json(TECHNIQUE_METRICS / name / "perf.json"))  # skipped or failed: no torch needed
        if result is None:
            from headline_bench.quality.score import score_technique

            result = score_technique(name, params)
    except (InputError, FileNotFoundError) as e:
        fail(f"score {name}: {e}")
    write_json(out, result)
    log.info("score: %s -> %s", name, out)


if __name__ == "__main__":
    main()
