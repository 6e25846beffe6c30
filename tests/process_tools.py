"""Find the processes of a throwaway Ray (by the temp dir in their command line) so tests can kill
exactly those and nothing else: `ray stop` would kill every Ray process of the user, the test
session's own included."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable


def pids_naming(text: str) -> list[int]:
    """Pids (other than this process) whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids


def kill_all(find_pids: Callable[[], list[int]], rounds: int = 3, pause_s: float = 0.5) -> None:
    """SIGKILL every process ``find_pids`` lists, a few rounds (a process forked while one round ran is
    caught by the next)."""
    for _ in range(rounds):
        for pid in find_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause_s)
