"""Stage serve: one serving entry (argv[1], params `serving.<entry>`) over data/prepared/quality.jsonl (served quality,
paired with the offline reference's data/quality records) and under load on data/prepared/timed.jsonl ->
metrics/serving/<entry>/serve.json, metrics/serving/<entry>/server.log and data/served/<entry>.jsonl."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import signal
import sys

from headline_bench.errors import InputError, fail
from headline_bench.files import QUALITY_ROWS, SERVED, SERVING_METRICS, TIMED_ROWS, keep_finished, read_jsonl, write_json, write_jsonl
from headline_bench.logs import log, setup_logging
from headline_bench.serving.run import resolve_entry, serve
from headline_bench.settings import load_params, stage_key


def main() -> None:
    setup_logging()
    name = stage_key("serve", sys.argv[1] if len(sys.argv) == 2 else None)
    params = load_params(required=["base", "prompt", "generate", "score", "serve", "serving"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit runs the Server's stop, like Ctrl-C
    try:
        entry = resolve_entry(params, name)
        rows, quality_rows = read_jsonl(TIMED_ROWS), read_jsonl(QUALITY_ROWS)[: params.serve.quality.rows]
        result, records = serve(name, entry, params, rows, quality_rows)
    except InputError as e:
        fail(f"serve {name}: {e}")
    keep_finished(f"serve {name}", result, SERVED / f"{name}.jsonl", SERVING_METRICS / name / "serve.json")  # outs persist (dvc.yaml)
    write_json(SERVING_METRICS / name / "serve.json", result)
    write_jsonl(SERVED / f"{name}.jsonl", records)
    server_log = SERVING_METRICS / name / "server.log"
    if not server_log.exists():  # a recorded skip started no server; the log (a DVC output) says so
        server_log.write_text(f"no server started: {result.get('skipped') or result.get('failed')}\n")
    sr = result.get("sustainable_rate") or {}
    lo, hi = sr.get("bracket") or [None, None]
    log.info("serve %s: %s -> %s", name, result.get("skipped") or result.get("failed") or f"sustainable rate {sr.get('bound')} {lo if lo is not None else hi} req/s",
             SERVING_METRICS / name / "serve.json")


if __name__ == "__main__":
    main()
