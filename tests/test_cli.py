"""The `prelort` command (docs/design.md section 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prelort.apps.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
FAST = [
    "--set",
    "rounds=1",
    "--set",
    "train.local_steps=1",
    "--set",
    "data.num_train=64",
    "--set",
    "data.num_test=8",
    "--set",
    "eval.max_examples=4",
    "--set",
    "eval.max_new_tokens=2",
    "--set",
    "eval.truncation_curve=false",
]

runner = CliRunner()


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "eval", "export", "report", "methods", "verify-update"):
        assert cmd in res.output


def test_methods_lists_the_six_with_a_description():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    lines = [l for l in res.output.splitlines() if l.strip()]
    names = [l.split()[0] for l in lines]
    assert sorted(names) == sorted(["prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora"])
    assert all(len(l.split()) > 3 for l in lines)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("clients.rank=[2]", "clients.rank: unknown key"),
        ("method=fedprox", "method:"),
        ("train.lr=-1", "train.lr:"),
        ("clients.per_round=9", "per_round (9) exceeds num (4)"),
        ("clients.ranks=[0, 2]", "clients.ranks:"),
    ],
)
def test_bad_config_names_the_key_and_reason(tmp_path, override, needle):
    res = runner.invoke(app, ["run", TINY, "--out", str(tmp_path / "r"), "--set", override])
    assert res.exit_code == 2
    assert needle in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method=flexlora", "privacy.dp=true"], "privacy.dp"),
        (["method=flora", "privacy.secure_aggregation=true"], "cannot run under secure aggregation"),
    ],
)
def test_unsupported_privacy_settings_are_refused_before_the_run_starts(tmp_path, overrides, needle):
    res = runner.invoke(app, ["run", TINY, "--out", str(tmp_path / "r"), *[a for o in overrides for a in ("--set", o)]])
    assert res.exit_code == 2 and needle in res.output
    assert not (tmp_path / "r").exists()


def test_malformed_yaml_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [prelort\n")
    res = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not valid YAML" in res.output


def test_run_then_export_loads_with_peft(tmp_path):
    from peft import PeftModel

    from prelort.config import ModelConfig
    from prelort.models import load_model

    d = tmp_path / "run"
    res = runner.invoke(app, ["run", TINY, "--out", str(d), "--quiet", *FAST])
    assert res.exit_code == 0, res.output
    out = tmp_path / "export4"
    res = runner.invoke(app, ["export", str(d), "--rank", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    base, _ = load_model(ModelConfig(name="tiny-llama"))
    model = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    res = runner.invoke(app, ["export", str(d), "--rank", "99", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "outside 1..8" in res.output
    # eval prints one JSON record per tier, for the latest round, and leaves the run directory as it was
    before = (d / "metrics.jsonl").read_text()
    res = runner.invoke(app, ["eval", str(d), "--rank", "2"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output.strip().splitlines()[-1])
    assert rec["round"] == 1 and rec["rank"] == 2 and rec["n"] == 4
    assert 0 <= rec["accuracy"] <= 1 and rec["perplexity"] >= 1
    assert rec["mode"] == "teacher_forced" and rec["rougeL"] is None  # short answers: eval.mode auto
    assert (d / "metrics.jsonl").read_text() == before
    res = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a prelort run directory" in res.output
