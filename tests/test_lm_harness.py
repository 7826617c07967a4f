"""``prelort eval RUN --lm-eval TASKS`` (issue 29): lm-evaluation-harness scores the base model and each rank tier
offline, on the shipped local multiple-choice task, writes eval/lm-eval-*.json and changes nothing else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prelort import lm_harness, runner
from prelort.apps.cli import app
from prelort.rundir import RunDir

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "examples" / "lm-eval"
cli = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config) -> Path:
    d = tmp_path_factory.mktemp("lm-eval") / "run"
    # one round at a large scale and learning rate, so that the tiers move away from the base model
    cfg = tiny_config("rounds=1", "lora.alpha=256", "train.lr=0.05")
    runner.run(cfg, d, verbose=False)
    runner.setup_logging(None, verbose=False)  # as in a new process: the run's run.log handler goes
    return d


def tree(d: Path) -> dict[str, str]:
    """Every file of a directory with its content's hash."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def test_lm_eval_scores_the_base_and_each_tier_offline(run_dir, monkeypatch, check_run):
    monkeypatch.chdir(ROOT)  # the example task's data_files is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree(run_dir)
    served = []  # what the model handed to lm-eval predicts on one prompt: differs between base and tiers
    real_score = lm_harness.score

    def spy(model, tokenizer, tasks, manager, **kwargs):
        with torch.no_grad():
            ids = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
            served.append(model(input_ids=ids).logits[0, -1].clone())
        return real_score(model, tokenizer, tasks, manager, **kwargs)

    monkeypatch.setattr(lm_harness, "score", spy)
    args = ["eval", str(run_dir), "--rank", "2", "--rank", "4", "--lm-eval", "prelort_capitals"]
    res = cli.invoke(app, [*args, "--include-path", str(TASKS), "--limit", "5"])
    assert res.exit_code == 0, res.output
    assert len(served) == 3  # base, rank 2, rank 4
    assert not torch.allclose(served[0], served[1]) and not torch.allclose(served[1], served[2])

    directory = RunDir(run_dir)
    for rank in ("base", 2, 4):
        path = directory.lm_eval_file(rank)
        scores = json.loads(path.read_text())
        assert scores["round"] == 1 and scores["rank"] == rank and scores["tasks"] == ["prelort_capitals"]
        task = scores["results"]["prelort_capitals"]
        assert 0.0 <= task["acc,none"] <= 1.0 and 0.0 <= task["acc_norm,none"] <= 1.0
        assert scores["n_samples"]["prelort_capitals"] == {"original": 8, "effective": 5}
        label = "base model" if rank == "base" else f"rank {rank}"
        assert f"{label} (round 1) -> {path}" in res.output
    assert res.output.count("|prelort_capitals|") == 3  # lm-eval's table, once per tier

    # nothing of the run changed but the three score files; it still follows the run-directory contract
    after = tree(run_dir)
    added = {f"eval/lm-eval-{n}.json" for n in ("base", "rank-2", "rank-4")}
    assert set(after) - set(before) == added
    assert {k: v for k, v in after.items() if k not in added} == before
    check_run(run_dir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lm-eval", "no_such_task", "--include-path", "examples/lm-eval"], "no task 'no_such_task' in"),
        (["--lm-eval", "prelort_capitals", "--include-path", "no/such/dir"], "is not a directory of lm-eval task"),
        (["--limit", "3"], "--include-path and --limit go with --lm-eval"),
        (["--lm-eval", " , "], "give one or more task names"),
    ],
)
def test_bad_lm_eval_arguments_are_one_line_errors(run_dir, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    before = tree(run_dir)
    res = cli.invoke(app, ["eval", str(run_dir), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1, res.output
    assert tree(run_dir) == before
