"""Child processes of a stage (timed processes, the quality process, torchrun and its ranks): they end with the stage.

Why: DVC, a user or a time limit may stop a stage by SIGTERM or SIGKILL. A child left running keeps the cores, appends
to the technique's checkpoint after the stage's lock is gone, and can write its result file after the next run's child,
which would then merge records made with the old settings. On Linux each child asks the kernel for SIGKILL when its
parent ends (PR_SET_PDEATHSIG), which also covers a SIGKILL of the stage, where no handler of ours runs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


TEST_SIGNAL = "HEADLINE_BENCH_TEST_SIGNAL"  # test hook "<technique>:<SIGNAME>": that technique's child process sends itself SIGNAME


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the parent: a child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux; a no-op elsewhere).

    Args:
        parent: the pid the parent had; if this process has another parent already (the parent ended before the
            request), it ends at once.
    """
    prctl = _prctl()
    if prctl is None:
        return
    if parent is None:
        parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` to its end as a child that dies with this process; its return code (negative: killed by that signal)."""
    _prctl()
    return subprocess.run(cmd, env=env, preexec_fn=functools.partial(die_with_parent, os.getpid())).returncode


def send_test_signal(name: str) -> None:
    """Test hook, read here only: kill this process with the signal TEST_SIGNAL names for technique `name`, as an
    engine built for another CPU (SIGILL), a segfault (SIGSEGV) or the OOM killer (SIGKILL) would; SIGSTOP leaves it
    stopped, for tests of what ends it."""
    technique, _, sig = os.environ.get(TEST_SIGNAL, "").partition(":")
    if technique == name and sig:
        os.kill(os.getpid(), signal.Signals[sig])
