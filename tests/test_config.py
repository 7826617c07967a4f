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
            "prelort.nested: Input should be 'all', 'sample', 'sandwich', 'off', 'sample_width' or 'cycle'",
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


# issue 26 item 8: a key given twice is refused, never taken from its last occurrence


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: 1\nrounds: 2\nseed: 3\n", "seed is given twice (lines 1 and 3)"),
        ("seed: 1\n'seed': 1\n", "seed is given twice (lines 1 and 2)"),  # the same key, quoted
        ("train:\n  lr: 0.1\nseed: 1\ntrain:\n  lr: 0.1\n", "train is given twice (lines 1 and 4)"),
        ("train:\n  lr: 0.1\n  local_steps: 2\n  lr: 0.2\n", "train.lr is given twice (lines 2 and 4)"),
        ("clients:\n  ranks: [2, 4]\ndata: {partition: {kind: iid, kind: iid}}\n", "data.partition.kind is given"),
        ("clients:\n  ranks:\n    - {a: 1, a: 2}\n", "clients.ranks.0.a is given twice (lines 3 and 3)"),
    ],
)
def test_a_yaml_key_given_twice_is_refused_with_its_dotted_path_and_lines(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_merge_is_not_a_duplicate_and_a_key_beside_it_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("x-base: &base\n  lr: 0.1\n  local_steps: 2\ntrain:\n  <<: *base\n  lr: 0.2\n")
    data = config_mod.parse_yaml(p.read_text())
    assert data["train"] == {"lr": 0.2, "local_steps": 2}
    p.write_text("x-base: &base\n  lr: 0.1\ntrain:\n  <<: *base\n  lr: 0.2\n  lr: 0.3\n")
    with pytest.raises(config_mod.DuplicateKeyError, match=r"train\.lr is given twice \(lines 5 and 6\)"):
        config_mod.parse_yaml(p.read_text())


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed = 1\nrounds = 2\nseed = 3\n", "seed is given twice (line 3)"),
        ("[train]\nlr = 0.1\n\n[clients]\nranks = [2, 4]\n\n[train]\nlr = 0.2\n", "[train] is given twice (line 7)"),
        ("[train]\nlr = 0.1\nlocal_steps = 2\nlr = 0.2\n", "train.lr is given twice (line 4)"),
    ],
)
def test_a_toml_key_given_twice_is_one_line_naming_the_key(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(e.value) == f"{p}: {message}; a key may appear only once"


def test_a_set_value_with_a_key_given_twice_is_refused_and_set_overrides_are_no_duplicates():
    with pytest.raises(ConfigError, match=r"override 'train=\{lr: 1, lr: 2\}': train\.lr is given twice"):
        config_mod.load(ROOT / "examples" / "tiny.yaml", ["train={lr: 1, lr: 2}"])
    cfg = config_mod.load(ROOT / "examples" / "tiny.yaml", ["seed=5", "seed=6", "train.lr=1e-4"])
    assert cfg.seed == 6 and cfg.train.lr == 1e-4  # --set replaces the file's key, the last --set wins


def test_a_run_config_yaml_with_a_key_given_twice_is_refused_on_resume_and_by_check(tmp_path):
    from prelort.check import check_run_dir
    from prelort.rundir import RunDir

    cfg = config_mod.load(ROOT / "examples" / "tiny.yaml")
    run = tmp_path / "run"
    run.mkdir()
    saved = cfg.to_yaml()
    (run / "config.yaml").write_text(saved + f"seed: {cfg.seed}\n")  # the same value twice: still refused
    lines = saved.count("\n")
    seed_line = 1 + saved.splitlines().index(f"seed: {cfg.seed}")
    with pytest.raises(ConfigError) as e:
        RunDir(run).check_resume_config(cfg)
    assert f"seed is given twice (lines {seed_line} and {lines + 1})" in str(e.value)
    assert str(e.value).startswith("--resume: the run's config.yaml is not a valid prelort config")
    assert any("seed is given twice" in problem for problem in check_run_dir(run))
