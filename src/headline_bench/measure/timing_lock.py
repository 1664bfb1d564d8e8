"""One timed section at a time per machine: a machine-wide flock around every timed section.

Why: two timed sections on the same cores (`dvc queue start -j 2`, two shells, a serving stage beside a generate
stage) slow each other down, and nothing in their numbers or fingerprints would show it. Each timed section (a
timed process's warm-up and timed passes, bench-decode's rounds, the serving stage's load levels, the GPU check's
device part) holds this lock; another one waits, and the wait is logged and recorded (`facts()`). Untimed work
(model loading, quality passes, scoring, reports) takes no lock, so it still runs in parallel.

The lock file is `HEADLINE_BENCH_TIMING_LOCK` or /tmp/headline-bench-timing.lock (every process on the machine sees
it; a container with its own /tmp is a machine of its own here). The holder writes one JSON line into it (pid,
label, since) so that a waiter can say whom it waits for. A holder sets HELD_ENV to its pid while it holds the lock:
processes it starts (timed processes of bench-decode and the GPU check, tensor parallel ranks) find the lock held
by that pid and do not wait for their own parent."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from headline_bench.logs import log

PATH_ENV = "HEADLINE_BENCH_TIMING_LOCK"     # the lock file (default DEFAULT_PATH)
HELD_ENV = "HEADLINE_BENCH_TIMING_LOCK_HELD"  # pid of the ancestor that holds the lock for this process
DEFAULT_PATH = Path("/tmp/headline-bench-timing.lock")


def lock_path() -> Path:
    return Path(os.environ.get(PATH_ENV) or DEFAULT_PATH)


@dataclass
class TimingLock:
    """What one timed section's lock did: how long it waited and for whom (perf.json `timing_lock`)."""

    path: str
    label: str
    wait_s: float = 0.0
    waited_for: dict[str, Any] | None = None  # the holder when this section asked: {"pid", "label", "since"}
    held_by_parent: int | None = None         # pid of the ancestor holding the lock (nothing was waited for here)

    def facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def holder(path: Path) -> dict[str, Any] | None:
    """The holder's line in the lock file (None: empty or unreadable; it may be mid-write)."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def open_lock(path: Path) -> int:
    """The lock file's descriptor, created readable and writable by every user (the lock is machine-wide).

    An existing file is opened without O_CREAT: in a sticky /tmp, Linux's protected_regular refuses O_CREAT on another
    user's file even where its mode allows writing. Without write permission the descriptor is read-only: flock works
    on it all the same, only the holder line is not written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pass
    except PermissionError:
        return os.open(path, os.O_RDONLY)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        os.fchmod(fd, 0o666)  # the umask took write permission from the others
    except PermissionError:
        pass
    return fd


def acquire(fd: int, path: Path, state: TimingLock, parent: str | None) -> bool:
    """Take the flock on `fd`, waiting where another section holds it. False: an ancestor (pid `parent`) holds it
    for this process, so nothing is taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    now = holder(path)
    settle = time.monotonic() + 1.0
    while now is None and time.monotonic() < settle:  # the holder may be between its flock and its line: ask again briefly
        time.sleep(0.02)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            now = holder(path)
    if parent and now and str(now.get("pid")) == parent:
        state.held_by_parent = int(parent)
        return False
    state.waited_for = now
    log.info("%s: waiting for the timing lock %s, held by %s", state.label, path, now or "another process")
    start = time.perf_counter()
    fcntl.flock(fd, fcntl.LOCK_EX)
    state.wait_s = time.perf_counter() - start
    log.info("%s: got the timing lock after %.1f s", state.label, state.wait_s)
    return True


@contextmanager
def timed_section(label: str) -> Iterator[TimingLock]:
    """Hold the machine-wide timing lock while the body runs; wait (and log whom for) when another section holds it.

    Args:
        label: what is timed, for the log and the holder line (e.g. "generate kv_cache").
    """
    path = lock_path()
    state = TimingLock(str(path), label)
    parent = os.environ.get(HELD_ENV)
    fd = open_lock(path)
    try:
        if not acquire(fd, path, state, parent):
            yield state
            return
        writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            line = json.dumps({"pid": os.getpid(), "label": label, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode() + b"\n", 0)
        os.environ[HELD_ENV] = str(os.getpid())
        try:
            yield state
        finally:
            if parent is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = parent
            if writable:
                os.ftruncate(fd, 0)  # nobody holds it now: a waiter that reads it sees no stale holder
    finally:
        os.close(fd)  # closing the descriptor releases the flock
