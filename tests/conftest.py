"""Shared fixtures: the tiny-llama base model (random weights, real SmolLM2 tokenizer)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """``(model, tokenizer)`` of the ``tiny-llama`` alias, loaded once per session.

    Shared by every test: do not modify it. ``attach_lora`` wraps a model in place, so take
    ``copy.deepcopy(model)`` (or use ``fresh_tiny_model``) before attaching an adapter.
    """
    from prelort.config import ModelConfig
    from prelort.models import load_model

    return load_model(ModelConfig(name="tiny-llama", device="cpu"))


@pytest.fixture()
def fresh_tiny_model(tiny_model):
    """``(model, tokenizer)``: a private deep copy of tiny-llama that a test may modify."""
    model, tokenizer = tiny_model
    return copy.deepcopy(model), tokenizer


CHECK_RUN = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "check_run.py"


@pytest.fixture(scope="session")
def check_run():
    """``check_run(run_dir)``: assert the run directory passes ../shared/tools/check_run.py (DESIGN section 8)."""

    def check(run_dir: Path) -> None:
        if not CHECK_RUN.is_file():
            pytest.skip("shared/tools/check_run.py not available")
        res = subprocess.run([sys.executable, str(CHECK_RUN), str(run_dir)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr

    return check
