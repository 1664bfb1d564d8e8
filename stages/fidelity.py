"""Stage fidelity: one technique (DVC_STAGE fidelity@<technique>, or argv[1] by hand) teacher-forced over baseline's greedy headlines against baseline's stored
distributions (data/fidelity/baseline.pt) -> data/fidelity/<technique>.jsonl (per row) and
metrics/techniques/<technique>/fidelity.json (KL, top-1 agreement, ΔNLL with intervals over rows, fidelity state)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import sys

from headline_bench.files import FIDELITY, TECHNIQUE_METRICS, write_json, write_jsonl
from headline_bench.logs import log, setup_logging
from headline_bench.quality.fidelity_scope import not_measured_record
from headline_bench.settings import load_params, stage_key


def main() -> None:
    setup_logging()
    name = stage_key("fidelity", sys.argv[1] if len(sys.argv) == 2 else None)
    params = load_params(required=["base", "generate", "prompt", "score", "techniques", "fidelity"])
    rows, result = [], not_measured_record(name, params)  # lossless, the reference, another model: no torch needed (~2.5 s)
    if result is None:
        from headline_bench.benchmark import guarded
        from headline_bench.quality.teacher import check_reference, fidelity_pass, load_reference

        reference = load_reference(FIDELITY / "baseline.pt")
        check_reference(reference, params)
        rows, result = guarded(name, params, lambda: fidelity_pass(name, params, reference))
    write_jsonl(FIDELITY / f"{name}.jsonl", rows)
    write_json(TECHNIQUE_METRICS / name / "fidelity.json", result)
    log.info("fidelity: %s -> %s", name, result.get("fidelity_state") or result.get("not_measured") or result.get("skipped") or result.get("failed"))


if __name__ == "__main__":
    main()
