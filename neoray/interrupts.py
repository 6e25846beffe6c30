"""SIGTERM does what Ctrl-C does, in every neoray command.

Kubernetes (pod eviction), Slurm and other batch schedulers stop a job with SIGTERM, then SIGKILL after a
grace period. neoray takes SIGTERM as Ctrl-C: the SIGINT handler in place at that moment runs (Ray Tune's,
during a sweep: it stops the trials and saves the sweep's state for ``--resume``; Ray Train's, during
``neoray train``: it aborts the workers, the run keeping its last checkpoint; elsewhere Python's, which raises
``KeyboardInterrupt``), the command writes what an interrupted one writes (a sweep's partial tables, a run's
summary), prints how to continue, and exits 143 (128 + SIGTERM) where Ctrl-C exits 130.

``ray.init`` installs its own SIGTERM handler in the driver, which exits at once (a sweep then died in an
abort, exit 134, with neither its tables nor its state written), so ``neoray.cluster.connect`` installs this
one again once Ray is up. Nothing here imports Ray or torch: ``neoray.cli`` reads ``terminated()`` too.
"""

from __future__ import annotations

import signal
import threading

_received: list[int] = []  # the SIGTERMs this process got


def install() -> None:
    """Make SIGTERM do what Ctrl-C does in this process (main thread only, where Python delivers signals)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Tune's, Ray Train's or Python's own (which raises KeyboardInterrupt)
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script) or default: SIGTERM still stops the command
        raise KeyboardInterrupt


def terminated() -> bool:
    """Whether this process was stopped by SIGTERM (rather than Ctrl-C)."""
    return bool(_received)


def how_stopped() -> str:
    """How the command was stopped, for its last line: "stopped by SIGTERM" or "interrupted"."""
    return "stopped by SIGTERM" if terminated() else "interrupted"


__all__ = ["how_stopped", "install", "terminated"]
