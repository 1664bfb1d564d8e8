"""An OpenAI-compatible inference server from start to a guaranteed stop: a free localhost port, a health check,
and a stop that takes its whole process group.

The server runs in its own process group (start_new_session) and is told by the kernel to die with the stage
(PR_SET_PDEATHSIG), so neither an exception, Ctrl-C, SIGTERM nor a killed stage leaves it running. Its output
goes to a log file kept beside the metrics. The command that starts each engine lives with the engine
(headline_bench.backends).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


class ServerError(RuntimeError):
    """The server did not start, stopped answering, or exited while it was measured."""


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (bound then released; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]




def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the stage's process dies, however it dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Server:
    """One server process (and everything it starts), from start to a guaranteed stop.

    Args:
        argv: the command; it must listen on `port`.
        port: where to reach it on 127.0.0.1.
        health_path: GET path that answers 200 once the model is loaded.
        log_path: stdout and stderr of the server.
        env: extra environment (offline flags, thread counts).
    """

    def __init__(self, argv: list[str], port: int, health_path: str, log_path: Path, env: dict[str, str] | None = None):
        self.argv, self.port, self.health_path, self.log_path = argv, port, health_path, Path(log_path)
        self.env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for localhost

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float) -> Server:
        """Start the process and wait until its health check answers 200; ServerError if it exits or times out."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, preexec_fn=die_with_parent)
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode} before it was ready: {self.log_tail()}")
            if self.healthy():
                self.startup_s = time.perf_counter() - start
                return self
            time.sleep(0.5)
        raise ServerError(f"server not ready after {timeout_s:g} s: {self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with self._opener.open(self.url + self.health_path, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the whole process group, SIGKILL after `grace_s`; returns the server's exit code."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None or group_alive(pgid):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not group_alive(pgid):
                    return self.proc.returncode
                time.sleep(0.1)
        self.proc.wait(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
