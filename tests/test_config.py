"""prelort.config: one validated object, YAML/TOML files, --set overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prelort import config as config_mod
from prelort.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_examples_load_and_round_trip_through_yaml(tmp_path):
    for name in ("tiny.yaml", "demo.yaml"):
        cfg = config_mod.load(ROOT / "examples" / name)
        again = tmp_path / name
        again.write_text(cfg.to_yaml())
        assert config_mod.load(again) == cfg


def test_overrides_use_yaml_values_and_dotted_paths():
    cfg = config_mod.load(
        ROOT / "examples" / "tiny.yaml",
        ["train.lr=1e-4", "clients.ranks=[2, 4]", "audit=true", "data.partition.kind=dirichlet"],
    )
    assert cfg.train.lr == 1e-4 and cfg.clients.ranks == [2, 4] and cfg.audit is True
    assert cfg.data.partition.kind == "dirichlet"
    assert cfg.clients.all_ranks() == [2, 4, 2, 4]


def test_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('method = "flexlora"\n[clients]\nranks = [2, 8]\n')
    cfg = config_mod.load(p)
    assert cfg.method == "flexlora" and cfg.clients.ranks == [2, 8]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrate=1"], "train.lrate: unknown key"),
        (["rounds=0"], "rounds: Input should be greater than or equal to 1"),
        (
            ["prelort.nested=most"],
            "prelort.nested: Input should be 'all', 'sample', 'sandwich', 'off' or 'sample_width'",
        ),
        (["clients.min_per_round=5"], "min_per_round (5) exceeds per_round (4)"),
        (["rounds"], "is not key.path=value"),
        (["rounds.x=1"], "rounds: is a value"),
    ],
)
def test_bad_values_name_the_key_and_the_reason(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_mod.load(ROOT / "examples" / "tiny.yaml", overrides)
    assert message in str(e.value)


def test_configuration_docs_are_up_to_date():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"])
    assert res.returncode == 0, "docs/configuration.md is stale: run python scripts/config_reference.py"
