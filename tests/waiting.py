"""Waiting for a background process to reach a state (before killing it mid-run in resume tests), and killing
the process an item runs in, as the journal names it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path


def wait_while_running(proc: subprocess.Popen, reached: Callable[[], bool], limit_s: float) -> None:
    """Poll until ``reached()`` or ``proc`` has exited, for at most ``limit_s`` seconds (a safety stop, not a
    speed check: the caller asserts on the state, not on the time)."""
    stop = time.monotonic() + limit_s
    while proc.poll() is None and not reached() and time.monotonic() < stop:
        time.sleep(0.05)


class Killer(threading.Thread):
    """SIGKILLs the process named by each new ``start`` record of ``item`` in the folder's journals, ``times``
    times."""

    def __init__(self, out: Path, item: str, times: int):
        super().__init__(daemon=True)
        self.out, self.item, self.times = out, item, times
        self.killed: list[int] = []
        self.stop = False

    def run(self) -> None:
        seen = set()
        while not self.stop and len(self.killed) < self.times:
            for journal in self.out.glob("journal*.jsonl"):
                for line in journal.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("start") == self.item and rec["pid"] not in seen:
                        seen.add(rec["pid"])
                        try:
                            os.kill(rec["pid"], signal.SIGKILL)
                            self.killed.append(rec["pid"])
                        except ProcessLookupError:
                            pass
            time.sleep(0.005)
