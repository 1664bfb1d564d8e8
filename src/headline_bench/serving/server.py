"""An OpenAI-compatible inference server from start to a guaranteed stop: a free localhost port, a health check
that is trusted only once the listening socket is the server's own, and a stop that takes its whole process group.

The server runs under a small group leader (serving/leader.py) in a process group of its own (start_new_session).
The kernel tells the leader when the stage dies (PR_SET_PDEATHSIG) and the leader then ends the whole group, so
neither an exception, Ctrl-C, SIGTERM nor a SIGKILLed stage leaves the server or the processes it started (vLLM's
engine processes) running. Another process that takes the port between free_port() and the server's bind would
answer the health check in the server's place: the socket's owner is checked, and such a start is a PortTaken error
(run.py then retries on a new port). Output goes to a log file kept beside the metrics. The command that starts
each engine lives with the engine (headline_bench.backends).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


LEADER = Path(__file__).with_name("leader.py")
ADDRESS_IN_USE = ("address already in use", "errno 98", "eaddrinuse", "couldn't bind", "failed to bind")


class ServerError(RuntimeError):
    """The server did not start, stopped answering, or exited while it was measured."""


class PortTaken(ServerError):
    """Another process holds the server's port (it bound it first): retry on a new port."""


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (bound then released; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]




def die_with_parent() -> None:
    """In the group leader before exec: SIGTERM (which it handles by ending its group) when the stage's process
    dies, however it dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def listeners(port: int) -> set[int | None]:
    """PIDs of the processes with a TCP socket listening on `port` (None for one this user may not inspect)."""
    import psutil

    return {c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def in_group(pid: int | None, pgid: int) -> bool:
    try:
        return pid is not None and os.getpgid(pid) == pgid
    except OSError:
        return False


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
        """Start the process under its group leader and wait until its health check answers 200 from a socket that
        the server's process group owns; PortTaken when another process holds the port, ServerError if the server
        exits or times out."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        argv = [sys.executable, str(LEADER), str(os.getpid()), *self.argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, preexec_fn=die_with_parent)
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                error = PortTaken if any(m in self.log_tail(20).lower() for m in ADDRESS_IN_USE) else ServerError
                raise error(f"server exited with code {self.proc.returncode} before it was ready: {self.log_tail()}")
            owners = listeners(self.port)
            if owners and not all(in_group(pid, self.proc.pid) for pid in owners):
                raise PortTaken(f"port {self.port} is held by another process (pid {', '.join(str(p) for p in owners)}), not the server")
            if owners and self.healthy():
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

    def alive(self, grace_s: float = 0.0) -> bool:
        """Whether the server still runs; `grace_s` waits that long for an exit in progress (the group leader
        notices its server's exit within 0.2 s)."""
        deadline = time.monotonic() + grace_s
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
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
        pgid = self.proc.pid  # start_new_session: the group leader (leader.py) heads the group
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
