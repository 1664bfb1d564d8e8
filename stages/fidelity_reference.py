"""Stage fidelity_reference: baseline's next-token distributions over its own greedy headlines (data/quality/baseline.jsonl),
teacher-forced, one forward pass per row -> data/fidelity/baseline.pt (top-k log-probs per position, reference-headline NLL)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

from headline_bench.errors import InputError, fail
from headline_bench.files import FIDELITY, QUALITY, read_jsonl
from headline_bench.logs import log, setup_logging
from headline_bench.quality.teacher import reference_pass, save_reference
from headline_bench.settings import load_params

OUT = FIDELITY / "baseline.pt"


def main() -> None:
    setup_logging()
    params = load_params(required=["base", "generate", "prompt", "techniques", "fidelity"])
    try:
        reference = reference_pass(params, read_jsonl(QUALITY / "baseline.jsonl"))
    except (InputError, FileNotFoundError) as e:
        fail(f"fidelity_reference: {e}")
    save_reference(reference, OUT)
    log.info("fidelity_reference: %d rows -> %s", len(reference["rows"]), OUT)


if __name__ == "__main__":
    main()
