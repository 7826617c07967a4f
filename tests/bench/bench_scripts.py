"""The benchmark scripts of bench/ as modules in the tests (bench/ is a package at the repository root, importable
through pyproject's pytest ``pythonpath``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_bench(name: str) -> ModuleType:
    """The module ``bench.<name>`` (bench/<name>.py)."""
    return importlib.import_module(f"bench.{name}")
