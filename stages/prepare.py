"""Stage prepare: params `prepare` -> data/prepared/test.jsonl (a clean, deterministic sample) and metrics/prepare.json."""

from __future__ import annotations

from headline_bench.data.prepare import prepare, read_source
from headline_bench.errors import InputError, fail
from headline_bench.files import METRICS, PREPARED, write_json, write_jsonl
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
    write_jsonl(PREPARED / "test.jsonl", sample)
    write_json(METRICS / "prepare.json", {"source": p.source, **counts})
    log.info("prepare: %s -> %s (%s)", p.source, PREPARED / "test.jsonl", counts)


if __name__ == "__main__":
    main()
