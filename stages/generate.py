"""Stage generate: one technique (argv[1]) over data/prepared/test.jsonl, in its own process ->
data/generations/<technique>.jsonl (per-row predictions and timings) and metrics/techniques/<technique>/perf.json."""

from __future__ import annotations

import sys
from contextlib import nullcontext

from headline_bench.benchmark import failure, generate, launch_parallel, settle, write_outputs
from headline_bench.errors import InputError, Skip, fail
from headline_bench.files import PREPARED, read_jsonl
from headline_bench.logs import log, setup_logging
from headline_bench.measure import checkpoints
from headline_bench.settings import Params, load_params
from headline_bench.techniques import tensor_parallel as tp


def main() -> None:
    setup_logging()
    if len(sys.argv) != 2:
        fail("usage: python stages/generate.py <technique>")
    name = sys.argv[1]
    params = load_params(required=["base", "generate", "prompt", "techniques"])
    try:
        # one run of a technique at a time (its checkpoint and outputs); tensor parallel ranks other than 0 share rank 0's
        with checkpoints.exclusive(name) if tp.rank() == 0 else nullcontext():
            run(name, params)
    except InputError as e:
        fail(str(e))


def run(name: str, params: Params) -> None:
    """Generate one technique and write its outputs (rank 0 only under tensor parallel)."""
    try:
        cfg, device = settle(params, name)
        if tp.needs_launch(cfg):  # re-run this stage as tp_size ranks under torchrun; rank 0 writes
            return launch_parallel(name, cfg, device)
        rows = read_jsonl(PREPARED / "test.jsonl")
        records, perf = generate(name, params, rows)
    except InputError:
        raise
    except KeyboardInterrupt:
        fail(f"{name}: interrupted; finished rows are kept under {checkpoints.CHECKPOINTS}/ and the next run resumes after them")
    except Skip as e:
        records, perf = [], {"technique": name, "skipped": str(e)}
    except Exception as e:  # an unsupported kernel, CUDA out of memory...: recorded, and the other techniques still run
        log.exception("%s failed", name)
        records, perf = [], failure(name, params, e)
    if tp.rank() == 0:
        write_outputs(name, records, perf)


if __name__ == "__main__":
    main()
