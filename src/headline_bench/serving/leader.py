"""Group leader for a served engine: `python leader.py PARENT_PID ARGV...` (stdlib only, Linux).

A server such as vLLM starts processes of its own. The kernel's parent-death signal reaches only the direct child
of the stage, so a SIGKILLed stage would leave those grandchildren running under PID 1. This helper leads the
server's process group (the stage starts it with start_new_session) and runs the server as its child in that group.
It asks for SIGTERM when the stage dies (PR_SET_PDEATHSIG, checked against a stage that died before the request took
effect) and, on SIGTERM, SIGINT or SIGHUP, ends every other process of its group: SIGTERM, then SIGKILL after
GRACE_S. It exits with the server's exit code (128 + signal when a signal ended it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0


def group_members() -> list[int]:
    """PIDs of this process group other than this process."""
    me, pgid = os.getpid(), os.getpgrp()
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.getpgid(int(name)) == pgid:
                    members.append(int(name))
            except OSError:
                pass
    return members


def end_group(child: subprocess.Popen) -> None:
    """SIGTERM to the rest of the group, SIGKILL to whatever is left after GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 1.0)):
        for pid in group_members():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and group_members():
            child.poll()  # reap the server so it does not linger as a zombie member
            time.sleep(0.05)


def exit_code(code: int | None) -> int:
    return 128 - code if code is not None and code < 0 else (code or 0)


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the stage died before the request above took effect
        sys.exit(143)
    child = subprocess.Popen(argv)

    def stop(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        end_group(child)
        sys.exit(exit_code(child.poll()) if child.poll() is not None else 128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    while child.poll() is None:
        if os.getppid() != parent:  # belt and braces: parent death without the signal (e.g. non-Linux)
            stop(signal.SIGTERM, None)
        time.sleep(0.2)
    sys.exit(exit_code(child.returncode))


if __name__ == "__main__":
    main()
