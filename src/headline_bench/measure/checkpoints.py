"""Resume an interrupted generate stage: every finished batch is appended to a checkpoint outside DVC's
outputs (DVC deletes a stage's outputs before running it), and a rerun continues from the first
unfinished row.

The checkpoint is `.cache/checkpoints/<technique>-<key>.jsonl` (gitignored, .dvcignored). The key hashes
everything that decides the predictions and the timings: the technique's resolved config, the base/generate/prompt
params, the source.json (sha256 or revision) of the models, the sha256 of the GGUF file llama.cpp reads, the rows,
the code of the stages and the environment fingerprint (host, device, library versions, thread settings). Any change
gives a new key, so a stale checkpoint, or one from another machine or thread count, is never resumed. It is deleted
when the technique's outputs are written. Greedy decoding of a row does not depend on other rows, so resumed
predictions equal an uninterrupted run's; timings of resumed rows come from the session that ran them.

File format, one JSON object per line: `{"session": n, "env": {...}}` opens each session (its environment), then
`{"session": n, "ids": [row ids], "gens": [records]}` per finished batch. A run holds `<technique>.lock`
(flock) for the whole stage, so two runs of one technique never append to one file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headline_bench.errors import InputError
from headline_bench.files import MODELS, PACKAGE, ROOT
from headline_bench.logs import log
from headline_bench.measure.environment import fingerprint

if TYPE_CHECKING:
    from headline_bench.settings import Params
    from headline_bench.techniques.config import ResolvedTechnique

CHECKPOINTS = Path(".cache/checkpoints")


STOP_AFTER = "HEADLINE_BENCH_STOP_AFTER_ROWS"  # test hook: KeyboardInterrupt once this many rows are checkpointed


LOCK_HELD = "HEADLINE_BENCH_LOCK_HELD"  # set by the tensor parallel launcher for its ranks: it holds the technique's lock


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def gguf_sha256(cfg: ResolvedTechnique, params: Params) -> str | None:
    """sha256 of the GGUF file a llama.cpp technique reads (the file in the pip package, not the converted copy)."""
    spec = params.models.get(cfg.model_name)
    if cfg.engine != "llama_cpp" or spec is None or not spec.gguf_package:
        return None
    from headline_bench.models.convert import locate_gguf, sha256

    return sha256(locate_gguf(spec))


def key(cfg: ResolvedTechnique, params: Params, rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """What decides the technique's predictions and timings, hashed (16 hex digits).

    Args:
        cfg / params / rows: the resolved technique, params.yaml, the rows to run.
        env: environment.env_info() of this process; its fingerprint is part of the key.
    """
    names = {params.base.model, params.base.target, cfg.model_name} - {None}
    models = {n: (MODELS / n / "source.json").read_text() for n in sorted(names) if (MODELS / n / "source.json").exists()}
    code = {str(p.relative_to(ROOT)): digest(p.read_text()) for p in sorted([*(ROOT / "stages").glob("*.py"), *PACKAGE.rglob("*.py")])}
    wanted = params.model_dump(mode="json", include={"base", "generate", "prompt"})
    return digest({"config": cfg.model_dump(mode="json"), "params": wanted, "models": models, "gguf_sha256": gguf_sha256(cfg, params), "rows": digest(rows),
                   "code": code, "env": fingerprint(env)})[:16]


@contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold `<technique>.lock` while a run of the technique works: a second run at the same time stops with a
    one-line error instead of appending to the same checkpoint (and pairing predictions with the wrong rows).

    Tensor parallel ranks started by the stage's launcher skip it (the launcher holds the lock: LOCK_HELD)."""
    if os.environ.get(LOCK_HELD) == name:
        yield
        return
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    path = CHECKPOINTS / f"{name}.lock"
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"{name}: another run of this technique is in progress ({holder} holds {path}); wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Checkpoint:
    """Finished rows of earlier sessions (`done`, in row order) and the file this session appends to."""

    path: Path
    done: list[Any]
    session: int
    row_ids: list[str]
    env: dict[str, Any]
    writer: bool = True
    session_envs: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0

    def _write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, gens: list[Any]) -> None:
        """Record one finished batch with its row ids (flushed to disk before the next batch starts)."""
        start = len(self.done) + self.written
        self.written += len(gens)
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start == len(self.done):  # this session's first batch: its environment first
                self._write({"session": self.session, "env": self.env})
            self._write({"session": self.session, "ids": self.row_ids[start : start + len(gens)], "gens": [asdict(g) for g in gens]})
        stop = os.environ.get(STOP_AFTER)
        if stop and self.written >= int(stop):
            raise KeyboardInterrupt(f"{STOP_AFTER}={stop}: stopped after {self.written} rows")

    def facts(self) -> dict[str, Any]:
        """What perf.json records about resuming: sessions, the rows resumed and each session's environment."""
        return {"sessions": self.session, "resumed_rows": len(self.done), "resumed_ids": self.row_ids[: len(self.done)],
                "per_session": "warmup_s, wall_s, energy and peak memory are this session's (the last); resumed rows keep "
                               "the latencies measured in their own session",
                "session_envs": [*self.session_envs, {"session": self.session, "rows": self.written, "env": self.env}]}


def read_entries(path: Path, row_ids: list[str], names: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The batches and session headers of a checkpoint that continue `row_ids` in order, and the byte offset where
    they end. Reading stops at the first line that is cut (no newline), unreadable, of another record shape, or whose
    row ids are not the next rows: that line and everything after it are rerun."""
    batches: list[dict[str, Any]] = []
    envs: list[dict[str, Any]] = []
    end = done = 0
    data = path.read_bytes()
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break  # cut by the interruption
        try:
            entry = json.loads(raw)
            if "env" in entry and "gens" not in entry:
                envs.append({"session": int(entry["session"]), "env": entry["env"]})
            else:
                ids, gens = entry["ids"], entry["gens"]
                if ids != row_ids[done : done + len(ids)] or len(gens) != len(ids) or any(set(g) != names for g in gens):
                    break
                batches.append(entry)
                done += len(ids)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
            break
        end += len(raw)
    if end < len(data):
        log.warning("%s: %d bytes after the last complete batch are dropped (a cut line or rows that do not match)", path, len(data) - end)
    return batches, envs, end


def open_checkpoint(name: str, cfg: ResolvedTechnique, params: Params, rows: list[dict[str, Any]],
                    make: type, env: dict[str, Any], writer: bool = True) -> Checkpoint:
    """Load the technique's checkpoint for this exact config and environment, if an earlier session left one.

    Args:
        name: the technique.
        cfg / params / rows: what the key hashes (the resolved technique, params.yaml, the rows to run).
        make: the record type to rebuild (backends.Generation).
        env: environment.env_info() of this session (in the key, and stored as this session's environment).
        writer: False on tensor parallel ranks other than 0 (they read, rank 0 writes).
    """
    path = CHECKPOINTS / f"{name}-{key(cfg, params, rows, env)}.jsonl"
    row_ids = [str(r["id"]) for r in rows]
    done: list[Any] = []
    envs: list[dict[str, Any]] = []
    session = 1
    if path.exists():
        batches, envs, end = read_entries(path, row_ids, {f.name for f in fields(make)})
        if writer:
            os.truncate(path, end)  # appends start on a line boundary, after the last batch that checked out
        for entry in batches:
            done += [make(**g) for g in entry["gens"]]
        session = max([1] + [e["session"] + 1 for e in [*batches, *envs]])
        rows_by_session: dict[int, int] = {}
        for entry in batches:
            rows_by_session[entry["session"]] = rows_by_session.get(entry["session"], 0) + len(entry["ids"])
        envs = [e | {"rows": rows_by_session.get(e["session"], 0)} for e in envs]
        log.info("%s: resuming from %s: %d rows done in %d earlier session(s)", name, path, len(done), session - 1)
    return Checkpoint(path, done, session, row_ids, env, writer, envs)


def clear(name: str) -> None:
    """Delete the technique's checkpoints once its outputs are written (stale keys included). Only files named exactly
    `<name>-<16 hex digits>.jsonl`: clearing `kv` leaves `kv-big`'s checkpoint alone."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.jsonl")
    for path in CHECKPOINTS.iterdir() if CHECKPOINTS.is_dir() else []:
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def disabled() -> Checkpoint:
    """No resume and no file: for timed processes after the first, which time every row again."""
    return Checkpoint(Path(os.devnull), [], 1, [], {}, writer=False)
