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
