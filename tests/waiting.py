"""Waiting for a background process to reach a state (before killing it mid-run in resume tests)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def wait_while_running(proc: subprocess.Popen, reached: Callable[[], bool], limit_s: float) -> None:
    """Poll until ``reached()`` or ``proc`` has exited, for at most ``limit_s`` seconds (a safety stop, not a
    speed check: the caller asserts on the state, not on the time)."""
    stop = time.monotonic() + limit_s
    while proc.poll() is None and not reached() and time.monotonic() < stop:
        time.sleep(0.05)
