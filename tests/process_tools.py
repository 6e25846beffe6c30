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


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of ``root`` and every process below it (a snapshot: a process whose parent died is
    no longer below it)."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        table[int(proc.name)] = (int(fields[1]), cmdline)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid][1]
            todo += [child for child, (ppid, _) in table.items() if ppid == pid]
    return found


def alive(pids) -> list[int]:
    """The pids of ``pids`` that still run (zombies, which only wait for their parent to read them, excluded)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out
