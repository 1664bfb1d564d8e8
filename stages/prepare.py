"""Stage prepare: params `prepare` -> data/prepared/quality.jsonl (a clean, deterministic sample of prepare.n rows),
data/prepared/timed.jsonl (its first prepare.timed_rows rows) and metrics/prepare.json."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

from headline_bench.data.prepare import prepare, read_source
from headline_bench.errors import InputError, fail
from headline_bench.files import METRICS, QUALITY_ROWS, TIMED_ROWS, write_json, write_jsonl
from headline_bench.logs import log, setup_logging
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    params = load_params(required=["prepare"])
    p = params.prepare
    try:
        rows = read_source(p.source, p.split, p.encoding, p.header)
        sample, counts = prepare(rows, p.summary_column, p.headline_column, p.n, params.base.seed, p.shuffle,
                                 source=p.source, id_column=p.id_column, dedupe=p.dedupe)
    except InputError as e:
        fail(str(e))
    wanted = p.timed_rows
    timed = sample[:wanted]  # a prefix: the timed rows' lossless check pairs up with the quality scores
    if len(timed) < wanted:
        log.warning("prepare: prepare.timed_rows is %d but the quality set has %d rows: timing all of them", wanted, len(sample))
    write_jsonl(QUALITY_ROWS, sample)
    write_jsonl(TIMED_ROWS, timed)
    write_json(METRICS / "prepare.json", {"source": p.source, **counts, "quality_rows": len(sample), "timed_rows": len(timed)})
    log.info("prepare: %s -> %s (%d rows), %s (%d rows) (%s)", p.source, QUALITY_ROWS, len(sample), TIMED_ROWS, len(timed), counts)


if __name__ == "__main__":
    main()
