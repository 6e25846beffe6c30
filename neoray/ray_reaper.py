"""A local Ray instance that neoray started never outlives the process that started it.

``ray.init()`` starts Ray's processes as children of the driver and ties the main ones (GCS, raylet, dashboard)
to it with a parent-death signal, but the raylet's own children, the dashboard agent and the runtime-env agent,
notice the raylet's end by polling and then try to report it to the GCS, which is gone too: after a SIGKILL of
the driver (the OOM killer, a node's eviction) they stayed alive for about a minute, holding memory and ports.
Ray 2.60 offers no setting that ties them to the driver.

So ``watch`` starts this file as a small watchdog process (standard library only, in a session of its own so
that Ctrl-C in the terminal does not reach it) whose stdin is a pipe from the driver. It keeps a list of the
processes of the Ray instance (the processes Ray started and everything below them, by pid and start time),
refreshed every ``POLL_S`` seconds; when the pipe reaches end of file (the driver has ended, however it ended)
it SIGKILLs those still alive. The start time guards against a reused pid. Linux only (it reads /proc); on other
systems ``watch`` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 1.0
_watchers: list[subprocess.Popen] = []  # kept for the driver's life: closing the pipe means "the driver ended"


def watch(root_pids: list[int]) -> subprocess.Popen | None:
    """Start the watchdog for the Ray processes ``root_pids`` (and their descendants) of this driver."""
    if not sys.platform.startswith("linux") or not root_pids:
        return None
    watcher = subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, root_pids)],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    _watchers.append(watcher)
    return watcher


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(name)] = (int(fields[1]), int(fields[19]))  # ppid, starttime (fields 4 and 22 of stat)
    return out


def _below(roots: list[int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of ``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            todo.extend(children.get(pid, ()))
    return found


def _driver_gone(timeout_s: float) -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    return bool(ready) and not os.read(sys.stdin.fileno(), 4096)


def main(argv: list[str]) -> None:
    roots = [int(pid) for pid in argv]
    known: dict[int, int] = {}
    while True:
        known.update(_below(roots + list(known), _processes()))
        if _driver_gone(POLL_S):
            break
    table = _processes()
    known.update(_below(roots + list(known), table))
    for pid, started in known.items():
        if pid != os.getpid() and table.get(pid, (0, None))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main(sys.argv[1:])
