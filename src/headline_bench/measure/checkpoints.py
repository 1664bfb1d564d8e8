"""Resume an interrupted generate stage: every finished batch is appended to a checkpoint outside DVC's
outputs (DVC deletes a stage's outputs before running it), and a rerun continues from the first
unfinished row.

The checkpoint is `.cache/checkpoints/<technique>-<key>.jsonl` (gitignored, .dvcignored). The key hashes
everything that decides the predictions: the technique's resolved config, the base/generate/prompt params,
the source.json (sha256 or revision) of the models, the rows and the code of the stages. Any change gives
a new key, so a stale checkpoint is never resumed. It is deleted when the technique's outputs are written.
Greedy decoding of a row does not depend on other rows, so resumed predictions equal an uninterrupted run's;
timings of resumed rows come from the session that ran them."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from headline_bench.files import MODELS, PACKAGE, ROOT
from headline_bench.logs import log

CHECKPOINTS = Path(".cache/checkpoints")


STOP_AFTER = "HEADLINE_BENCH_STOP_AFTER_ROWS"  # test hook: KeyboardInterrupt once this many rows are checkpointed


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def key(cfg: dict[str, Any], params: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What decides the technique's predictions, hashed (16 hex digits)."""
    names = {params["base"].get("model"), params["base"].get("target"), cfg.get("model_name")} - {None}
    models = {n: (MODELS / n / "source.json").read_text() for n in sorted(names) if (MODELS / n / "source.json").exists()}
    code = {str(p.relative_to(ROOT)): digest(p.read_text()) for p in sorted([*(ROOT / "stages").glob("*.py"), *PACKAGE.rglob("*.py")])}
    wanted = {k: params.get(k) for k in ("base", "generate", "prompt")}
    return digest({"config": cfg, "params": wanted, "models": models, "rows": digest(rows), "code": code})[:16]


@dataclass
class Checkpoint:
    """Finished rows of earlier sessions (`done`, in prompt order) and the file this session appends to."""

    path: Path
    done: list[Any]
    session: int
    writer: bool = True
    resumed_ids: list[str] = field(default_factory=list)
    written: int = 0

    def append(self, gens: list[Any]) -> None:
        """Record one finished batch (flushed to disk before the next batch starts)."""
        self.written += len(gens)
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"session": self.session, "gens": [asdict(g) for g in gens]}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        stop = os.environ.get(STOP_AFTER)
        if stop and self.written >= int(stop):
            raise KeyboardInterrupt(f"{STOP_AFTER}={stop}: stopped after {self.written} rows")

    def facts(self) -> dict[str, Any]:
        """What perf.json records about resuming."""
        return {"sessions": self.session, "resumed_rows": len(self.done), "resumed_ids": self.resumed_ids,
                "per_session": "warmup_s, wall_s and peak memory are this session's (the last); resumed rows keep "
                               "the latencies measured in their own session"}


def open_checkpoint(name: str, cfg: dict[str, Any], params: dict[str, Any], rows: list[dict[str, Any]],
                    make: type, writer: bool = True) -> Checkpoint:
    """Load the technique's checkpoint for this exact config, if an earlier session left one.

    Args:
        name: the technique.
        cfg / params / rows: what the key hashes (the resolved technique, params.yaml, the rows to run).
        make: the record type to rebuild (backends.Generation).
        writer: False on tensor parallel ranks other than 0 (they read, rank 0 writes).
    """
    path = CHECKPOINTS / f"{name}-{key(cfg, params, rows)}.jsonl"
    done: list[Any] = []
    session = 1
    names = {f.name for f in fields(make)}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                if any(set(g) != names for g in entry["gens"]):
                    break
                batch = [make(**g) for g in entry["gens"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut by the interruption: that batch reruns
            done += batch
            session = max(session, entry["session"] + 1)
        log.info("%s: resuming from %s: %d rows done in %d earlier session(s)", name, path, len(done), session - 1)
    ids = [r["id"] for r in rows[: len(done)]]
    return Checkpoint(path, done, session, writer, ids)


def clear(name: str) -> None:
    """Delete the technique's checkpoints once its outputs are written (stale keys included)."""
    for path in CHECKPOINTS.glob(f"{name}-*.jsonl"):
        path.unlink(missing_ok=True)


def disabled() -> Checkpoint:
    """No resume and no file: for timed processes after the first, which time every row again."""
    return Checkpoint(Path(os.devnull), [], 1, writer=False)
