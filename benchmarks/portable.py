"""Benchmark records as committed: they name no path of the machine that made them.

A record (a JSON-able dict) is written with this interpreter shown as ``python`` and paths inside the repository
relative to it, as a reader would type them from the repository root.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def portable(record: dict) -> dict:
    text = json.dumps(record)
    for local, shown in ((os.path.abspath(sys.executable), "python"), (sys.executable, "python"),
                         (str(REPO_ROOT) + os.sep, "")):
        text = text.replace(json.dumps(local)[1:-1], shown)
    return json.loads(text)


__all__ = ["portable"]
