"""Adding an engine is one file plus its registration: tests/engines/counting_engine.py, registered from the test
suite, is accepted by the config, answered by the secure-aggregation check and runs a whole federation when the
config names it (``engine: counting``), with no edit anywhere in prelort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prelort import engines
from prelort.check import check_run_dir
from prelort.config import ConfigError, load
from prelort.federation import check_privacy
from prelort.runner import run

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "examples" / "tiny.yaml"
FAST = [
    "train.local_steps=1",
    "train.batch_size=2",
    "data.max_length=32",
    "data.num_test=4",
    "data.num_train=64",
    "eval.max_examples=2",
    "eval.max_new_tokens=1",
    "eval.truncation_curve=false",
    "eval.base=false",
    "rounds=2",
]
BUILT_IN = "engine: Input should be 'inprocess', 'flower-sim' or 'flower'"


@pytest.fixture
def counting(load_plugin):
    """The extra engine's module, registered while the test runs (loading its file registers it), then removed."""
    module = load_plugin(HERE / "counting_engine.py")
    yield module
    engines.unregister("counting")


def test_the_config_accepts_it_only_while_it_is_registered(counting):
    assert list(engines.available()) == ["inprocess", "flower-sim", "flower", "counting"]
    assert load(TINY, ["engine=counting"]).engine == "counting"
    with pytest.raises(ConfigError, match="engine: Input should be 'inprocess', 'flower-sim', 'flower' or 'counting'"):
        load(TINY, ["engine=countin"])
    engines.unregister("counting")
    try:
        with pytest.raises(ConfigError, match=BUILT_IN):
            load(TINY, ["engine=counting"])
    finally:
        engines.register(counting.SPEC)


def test_secure_aggregation_asks_its_entry(counting):
    assert counting.SPEC.in_process and not counting.SPEC.secure_aggregation
    with pytest.raises(
        ConfigError,
        match="privacy.secure_aggregation: needs engine flower-sim or flower "
        r"\(Flower's SecAgg\+ protocol\); engine counting has no separate parties",
    ):
        check_privacy(load(TINY, ["engine=counting", "privacy.secure_aggregation=true"]))


def test_an_entry_says_how_a_run_starts_exactly_once():
    with pytest.raises(ValueError, match="exactly one of build"):
        engines.EngineSpec("neither", "no way to start")
    with pytest.raises(ValueError, match="exactly one of build"):
        engines.EngineSpec("both", "two ways to start", build="a:b", launch="c:d")
    with pytest.raises(KeyError, match="unknown engine 'nope'; known: inprocess, flower-sim, flower"):
        engines.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        engines.register(engines.EngineSpec("inprocess", "another", build="a:b"))


def _records(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_federation_runs_on_it_end_to_end_with_the_numbers_of_inprocess(counting, tmp_path):
    cfg = load(TINY, [*FAST, "engine=counting"])
    out = run(cfg, tmp_path / "counting", verbose=False)
    assert check_run_dir(out) == []
    (engine,) = counting.CountingEngine.built  # runner.run built it from the table
    assert engine.clients_by_round == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}  # clients.per_round = 4 of 4
    reference = run(load(TINY, [*FAST]), tmp_path / "inprocess", verbose=False)
    assert _records(out) == _records(reference)
    for name in ("checkpoints/round-2/adapter.safetensors", "adapters/rank-8/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
