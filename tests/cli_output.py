"""What a neoray command said to its user, apart from what Ray forwarded from its own processes.

Ray copies warnings of its raylet and workers onto the driver's stderr, prefixed with the process in
parentheses: ``(raylet) ... is over 95% full`` on a nearly full disk, ``(RayTrainWorker pid=12) ...``.
Those lines depend on the machine, not on neoray, so a check that neoray's error is one line ignores them.
"""

from __future__ import annotations

import re

# an optional colour code, then "(raylet)", "(pid=12)" or "(SomeActor pid=12, ip=10.0.0.1)"
RAY_FORWARDED = re.compile(r"^\s*(\x1b\[[0-9;]*m)?\((raylet|gcs_server|[^()]*\bpid=\d+[^()]*)\)")


def user_lines(text: str) -> list[str]:
    """The non-blank lines of ``text`` that Ray did not forward from its own processes."""
    return [line for line in text.splitlines() if line.strip() and not RAY_FORWARDED.match(line)]


def one_line(text: str) -> str:
    """The single line the command wrote for its user; fails when it wrote more or a traceback."""
    lines = user_lines(text)
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]
