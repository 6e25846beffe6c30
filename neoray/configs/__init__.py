"""The configs that travel with the package: the default training config and search space of ``neoray
sweep``, and the examples README names. ``experiments/configs/`` links to these files, so there is one copy
of each, found the same way from a source checkout and from ``pip install .``."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "synthetic_cpu.yaml"
DEFAULT_SPACE = CONFIG_DIR / "space_default.yaml"

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "DEFAULT_SPACE"]
