"""Shared fixtures: the tiny-llama base model (random weights, real SmolLM2 tokenizer)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's intra-op thread count after each test: a bench main run inline sets it (``--threads``),
    and a different count splits float reductions differently, so later bit-for-bit comparisons would drift."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def check_run():
    """``check_run(run_dir)``: assert the run directory follows the run-directory contract (``prelort check``)."""
    from prelort.check import check_run_dir

    def check(run_dir: Path) -> None:
        problems = check_run_dir(run_dir)
        assert not problems, "\n".join(problems)

    return check


@pytest.fixture(scope="session")
def load_plugin():
    """``load_plugin(path)``: execute a plug-in file of the test suite (an extra method, metric or engine) as the
    module ``prelort_tests_<stem>``; loading it registers what it defines (each test unregisters it after)."""
    import importlib.util

    def load(path: Path):
        spec = importlib.util.spec_from_file_location(f"prelort_tests_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(*overrides)``: examples/tiny.yaml cut to the smallest run with every kind of record (two
    clients of ranks 2 and 4, two evaluated examples, no truncation curve), plus ``overrides``."""
    from prelort import config as config_mod

    base = [
        "clients.num=2",
        "clients.per_round=2",
        "clients.ranks=[2, 4]",
        "data.num_train=16",
        "data.num_test=2",
        "eval.max_examples=2",
        "eval.max_new_tokens=2",
        "eval.truncation_curve=false",
    ]

    def load(*overrides: str):
        return config_mod.load(Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml", [*base, *overrides])

    return load
