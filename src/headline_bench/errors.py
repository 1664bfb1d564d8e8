"""The two ways a run stops short of a number: bad input (a one-line error) or a recorded skip."""

from __future__ import annotations

import sys

from headline_bench.logs import log


class Skip(Exception):
    """Raised when a technique cannot run here; the message is the recorded reason."""


class InputError(Exception):
    """Bad input data; the message is the one-line error shown to the user."""


def fail(message: str) -> None:
    """Exit with a clear one-line error per problem (no traceback) for bad input or config."""
    lines = message.splitlines() or [message]
    for line in lines:
        log.error(line)
    sys.exit("\n".join(f"error: {line}" for line in lines))


class ProcessDied(RuntimeError):
    """A child process (a timed process, a quality worker) was killed by a signal: recorded as that technique's failure."""


def exit_reason(code: int) -> str:
    """A child's return code in words: "signal SIGILL (illegal instruction)" for a negative code, else "exit code N".

    Why: a timed process that dies by a signal (an engine built for another CPU, the OOM killer) must cost only its
    own row, and the row should say what killed it."""
    import signal

    if code >= 0:
        return f"exit code {code}"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"signal {-code}"
    return f"signal {sig.name} ({signal.strsignal(sig) or sig.name})"
