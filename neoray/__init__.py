"""neoray: Ray-based distributed sweeps for 16:9 object detectors."""

__version__ = "0.1.0"
